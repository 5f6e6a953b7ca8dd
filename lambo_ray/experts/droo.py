"""DROO (Huang, Bi, Zhang, IEEE TMC 2020), adapted from binary offloading to M servers.

The loop of the paper (public code revenol/DROO), one step per instance:

1. a DNN maps the instance's features to a relaxed action, here a softmax over the M+1 targets
   {local, server 1..M} per UE (the paper: one sigmoid per UE for {local, offload});
2. order-preserving quantisation turns it into K candidate assignments (:func:`order_preserving_quantise`,
   which reduces exactly to the paper's eq. (8)-(9) when there are two options);
3. each candidate is projected onto the capacity constraint (:func:`project_feasible`: an overloaded
   server sends its largest consumers local), completed with the optimal (water-filled) shares and
   scored by the evaluator (``objectives_batch``); infeasible ones are rejected; the best is the decision;
4. the decision is stored in a FIFO replay memory and every ``train_interval`` steps the DNN takes one
   Adam step on a random batch from it (cross-entropy to the stored best action; binary cross-entropy
   in the paper);
5. adaptive K: every ``k_update_interval`` (Delta) steps, K = min(max index of the best candidate over
   the last Delta steps + 2, K_max), as in the public code.

Constants follow the public code: hidden layers (120, 80), Adam lr 0.01 with betas (0.09, 0.999) and
weight decay 1e-4, memory 1024, batch 128, training interval 10, Delta 32, K_max = N.
(The public PyTorch port re-creates the Adam optimiser at every training step; we keep one.)

Adaptation choices: the input is dimensionless per-UE features instead of raw channel gains (which the
paper scales by 1e6 "to be close to 1"); targets that cannot meet a UE's deadline even with a whole
server (or locally) are masked out of the relaxed action, so no candidate wastes a slot on them; the
projection of step 3 (``project=False`` turns it off: without it an untrained DNN's candidates are
all infeasible and the memory fills with fallbacks). If none of the K candidates is feasible, all
K_max are tried (``stats["widened"]``); if still none, the decision falls back to all-local with the
must-offload UEs placed first-fit (``stats["fallback"]``).
The DNN's widths depend on (N, M): one trained model serves one cell shape (LamboInputError otherwise).

Measured on the paper scenario (N=50, M=4): learning is fast and then plateaus (min_energy mean
objective 266 untrained, 249 after 300 steps, 250 after 10000; K shrinks to ~5): the flat DNN imitates
the best of its own K neighbours and does not generalise far beyond them at this input width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.base import register
from lambo_ray.experts.online import (
    OnlineExpert,
    ReplayMemory,
    config_from,
    fallback_assignment,
    fits_optimal,
    reachable_targets,
    seeded_module,
)
from lambo_ray.mec.evaluator import objectives_batch
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.mec.shares import optimal_shares


@dataclass
class DROOConfig:
    hidden: tuple[int, int] = (120, 80)
    lr: float = 0.01
    adam_betas: tuple[float, float] = (0.09, 0.999)
    weight_decay: float = 1e-4
    memory_size: int = 1024
    batch_size: int = 128
    train_interval: int = 10
    k_max: int | None = None  # None: N, as in the paper
    k_update_interval: int = 32  # Delta; 0 disables adaptive K (K stays K_max)
    warmup_steps: int = 300  # generated instances to learn from before the first decision of a prompt
    online: bool = True  # keep learning on the instances it is asked to solve
    project: bool = True  # send overloaded servers' largest consumers local (see project_feasible)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("memory_size", "batch_size", "train_interval"):
            if getattr(self, name) < 1:
                raise LamboInputError(f"DROOConfig.{name} must be >= 1 (got {getattr(self, name)})", where="config")
        if self.k_max is not None and self.k_max < 1:
            raise LamboInputError(f"DROOConfig.k_max must be >= 1 (got {self.k_max})", where="config")
        if self.warmup_steps < 0 or self.k_update_interval < 0:
            raise LamboInputError("DROOConfig.warmup_steps and k_update_interval must be >= 0", where="config")
        self.hidden = tuple(self.hidden)
        self.adam_betas = tuple(self.adam_betas)


# The minimum share a_min_ij is clipped here (above 1 the server cannot host the UE at all).
MAX_SHARE_FEATURE = 2.0


def feature_width(n: int, m: int) -> int:
    return n * (3 * m + 3)


def droo_features(inst: Instance) -> np.ndarray:
    """Dimensionless per-UE features, flattened to one vector of N (3M + 3) values.

    Per UE: log(d_i/r_ij / (c_i/f_i)) and log(c_i/F_j / (c_i/f_i)) for every server (transmission and
    remote compute time relative to the local time: what decides local vs offload for both prompts),
    the minimum share a_min_ij that meets the deadline on server j (the "weight" of the UE in server j's
    capacity, clipped at 2), log(T_i / (c_i/f_i)) (deadline slack), c_i and d_i relative to the mean.
    """
    local = inst.local_latency()
    tx = np.log(inst.tx_latency() / local[:, None])
    compute = np.log(inst.local_cps[:, None] / inst.capacity_cps[None, :])
    a_min = np.minimum(inst.min_share(), MAX_SHARE_FEATURE)
    per_ue = np.column_stack(
        [
            tx,
            compute,
            a_min,
            np.log(inst.deadline_s / local),
            inst.cycles / inst.cycles.mean(),
            inst.data_bits / inst.data_bits.mean(),
        ]
    )
    return per_ue.astype(np.float32).ravel()


def order_preserving_quantise(prob: np.ndarray, k: int) -> np.ndarray:
    """K distinct assignments from a relaxed action ``prob`` (N, M+1), best guess first.

    Candidate 1 takes every UE's most likely target. With the confidence margin of UE i being
    p_i(best) - p_i(second), candidate k+1 takes the UE u with the k-th smallest margin and moves to
    their second-best target every UE whose best target equals u's and whose margin is <= u's margin.
    For two options this is exactly DROO's eq. (9): thresholding the sigmoid output at m_u flips the
    UEs on u's side of 0.5 that lie between 0.5 and m_u. UEs whose second option has probability 0
    (masked) never move. Duplicates (ties) are dropped, so fewer than k may come back.
    """
    if prob.ndim != 2 or prob.shape[1] < 2:
        raise ValueError(f"prob must be (N, options >= 2), got {prob.shape}")
    rows = np.arange(prob.shape[0])
    order = np.argsort(-prob, axis=1, kind="stable")
    best, second = order[:, 0], order[:, 1]
    margin = prob[rows, best] - prob[rows, second]
    movable = prob[rows, second] > 0
    candidates = [best]
    pivots = np.flatnonzero(movable)
    for u in pivots[np.argsort(margin[pivots], kind="stable")][: max(k - 1, 0)]:
        flip = movable & (best == best[u]) & (margin <= margin[u])
        candidates.append(np.where(flip, second, best))
    out = np.stack(candidates)
    _, first = np.unique(out, axis=0, return_index=True)
    return out[np.sort(first)]


def project_feasible(inst: Instance, target: np.ndarray, a_min: np.ndarray | None = None) -> np.ndarray:
    """Make a quantised assignment respect the servers' capacity: while the minimum shares of a
    server's UEs sum above 1, send its largest consumer that can run locally back to local.

    DROO's candidates are always feasible (binary offloading cannot overload anything) and its
    completion step only allocates resources; with deadlines and shared servers a quantised assignment
    can overload a server, so this projection keeps the paper's "every candidate is a decision" property.
    Must-offload UEs are never moved; if they alone overload a server the candidate stays infeasible.
    """
    target = np.array(target, dtype=np.int64, copy=True)
    a_min = inst.min_share() if a_min is None else a_min
    can_local = inst.local_feasible()
    for j in range(inst.n_servers):
        members = np.flatnonzero(target == j + 1)
        load = a_min[members, j]
        total = load[np.isfinite(load)].sum()
        for i in members[np.argsort(-load, kind="stable")]:  # unreachable (a_min = inf) ones first
            if total <= 1.0 and np.isfinite(a_min[i, j]):
                break
            if can_local[i]:
                target[i] = 0
                total -= a_min[i, j] if np.isfinite(a_min[i, j]) else 0.0
    return target


class _Agent:
    """DNN + optimiser + replay memory + adaptive K for one prompt."""

    def __init__(self, cfg: DROOConfig, n: int, m: int, seed: int) -> None:
        self.cfg, self.n, self.m = cfg, n, m
        in_dim, out_dim = feature_width(n, m), n * (m + 1)
        h1, h2 = cfg.hidden
        self.net = seeded_module(
            seed,
            lambda: nn.Sequential(
                nn.Linear(in_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, out_dim)
            ),
        )
        self.opt = torch.optim.Adam(
            self.net.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
        )
        self.memory = ReplayMemory(cfg.memory_size, in_dim, (n,))
        self.rng = np.random.default_rng(seed)
        self.k_max = cfg.k_max or n
        self.k = self.k_max
        self.best_index_history: list[int] = []
        self.losses: list[float] = []

    def relaxed_action(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.net(torch.from_numpy(x)[None]).view(self.n, self.m + 1)
        logits = logits.masked_fill(~torch.from_numpy(mask), float("-inf"))
        return torch.softmax(logits, dim=1).double().numpy()

    def learn(self) -> None:
        x, y = self.memory.sample(self.cfg.batch_size, self.rng)
        self.net.train()
        logits = self.net(torch.from_numpy(x)).view(-1, self.m + 1)
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(y).view(-1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())

    def adapt_k(self, best_index: int) -> None:
        """DROO's adaptive K: every Delta steps, K = min(max recent best index + 2, K_max)."""
        self.best_index_history.append(best_index)
        delta = self.cfg.k_update_interval
        steps = len(self.best_index_history)
        if delta > 0 and steps % delta == 0:
            self.k = min(max(self.best_index_history[-delta:]) + 2, self.k_max)
            del self.best_index_history[:-delta]

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "memory": self.memory.state(),
            "k": self.k,
            "best_index_history": list(self.best_index_history),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.memory.load(state["memory"])
        self.k = int(state["k"])
        self.best_index_history = list(state["best_index_history"])
        self.rng.bit_generator.state = state["rng"]


class DROO(OnlineExpert):
    """DROO adapted to M servers; stateful (see module docstring). Public API beyond ``solve``:
    ``warmup(instances, prompt)``, ``state_dict``/``load_state_dict``, ``save``/``load``."""

    name = "droo"

    def __init__(self, config: DROOConfig | None = None) -> None:
        super().__init__()
        self.config = config or DROOConfig()

    def _new_agent(self, n: int, m: int, prompt: str) -> _Agent:
        return _Agent(self.config, n, m, seed=self.config.seed * len(PROMPTS) + PROMPTS.index(prompt))

    def fix_k(self, prompt: str, k: int) -> None:
        """Pin the number of candidates for ``prompt`` (k = 1: the DNN's own decision, no search)."""
        if k < 1:
            raise LamboInputError(f"k must be >= 1 (got {k})", where="k")
        agent = self.agent(prompt)
        agent.k = agent.k_max = k

    def candidates(self, agent: _Agent, inst: Instance, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k quantised assignments for ``inst`` (projected onto the capacity constraint when
        ``config.project``) and the relaxed action they came from."""
        prob = agent.relaxed_action(droo_features(inst), reachable_targets(inst))
        targets = order_preserving_quantise(prob, k)
        if self.config.project:
            a_min = inst.min_share()
            targets = np.stack([project_feasible(inst, t, a_min) for t in targets])
        return targets, prob

    @staticmethod
    def _select(inst: Instance, targets: np.ndarray, prompt: str) -> tuple[int, list[np.ndarray | None]]:
        """Index of the best feasible candidate (-1 if none) under optimal shares, and those shares."""
        shares = [optimal_shares(inst, t) for t in targets]
        ok = np.array([s is not None for s in shares])
        if not ok.any():
            return -1, shares
        obj, feasible = objectives_batch(inst, targets[ok], np.stack([s for s in shares if s is not None]), prompt)
        if not feasible.any():
            return -1, shares
        idx = np.flatnonzero(ok)[feasible]
        return int(idx[np.argmin(obj[feasible])]), shares

    def _step(self, agent: _Agent, inst: Instance, prompt: str, learn: bool):
        targets, _ = self.candidates(agent, inst, agent.k)
        best, shares = self._select(inst, targets, prompt)
        widened = best < 0 and agent.k < agent.k_max
        if widened:  # nothing feasible among the K: search all K_max candidates before falling back
            targets, _ = self.candidates(agent, inst, agent.k_max)
            best, shares = self._select(inst, targets, prompt)
        fallback = best < 0
        if best >= 0:
            target, share = targets[best], shares[best]
        else:
            target = fallback_assignment(inst, fits_optimal)
            share = None if target is None else optimal_shares(inst, target)
            if share is None:  # nothing feasible found: all-local, which the evaluator reports infeasible
                target, share = np.zeros(inst.n_ues, dtype=np.int64), np.zeros(inst.n_ues)
        if learn:
            agent.memory.add(droo_features(inst)[None], target[None])
            if agent.memory.count % self.config.train_interval == 0:
                agent.learn()
            agent.adapt_k(max(best, 0))
        stats = {"k": int(len(targets)), "best_index": best, "fallback": fallback, "widened": widened}
        return target, share, stats


@register("droo")
def make_droo(seed: int = 0, checkpoint: str | None = None, **overrides: Any) -> DROO:
    """``get_expert("droo", seed=..., warmup_steps=..., checkpoint=PATH)``: a DROO expert, optionally loaded."""
    expert = DROO(config_from(DROOConfig, seed=seed, **overrides))
    if checkpoint is not None:
        expert.load(checkpoint)
    return expert
