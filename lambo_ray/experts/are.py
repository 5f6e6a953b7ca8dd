"""ARE (Jiang, Wang, Dong, Pan, Xu, Yang, "AI driven heterogeneous MEC system with UAV assistance for
dynamic environment", IEEE Network 2020; public MATLAB code jiangfeibo/ARE): a per-UE MLP policy
trained from a replay memory on actions refined by simulated annealing ("action refinement").

Facts taken from the public code (DRLopt.m, SA.m, DeepLearnToolbox):

- the network sees one row per UE (normalised data and cycles, channel to every server normalised by
  the UE's best one, a per-server state) and outputs a sigmoid score per target {local, 1..M};
  architecture [in, 64, 32, out], sigmoid hidden units, squared-error loss 1/2 sum e^2 / rows, plain SGD
  with learning rate 1.5 and momentum 0.5 (DeepLearnToolbox), weights uniform +-4 sqrt(6/(fan_in+fan_out));
- the replay memory holds 40% of the 500 scenarios (200 scenarios x N rows), FIFO; every step trains
  10 epochs on a random tenth of it (one full-batch step per epoch);
- SA starts from the network's action: initial temperature 1000, final 1, Metropolis acceptance
  exp(-dfit / (0.01 T)), cooling factor ``damp`` rising linearly from 0.85 to 0.965 over the stream
  ("gradually improve SA search accuracy"); a move re-targets one random UE: to the server with the
  best channel if the UE's normalised channels sum below 1.6, else roulette-wheel by channel;
- each server's capacity is split equally among its UEs (GreedyUE.m / CalT.m; the labels in the
  released data are exactly 1/n_j), and ``corresult`` sends back to local every offloaded UE that does
  worse than local (latency above T_local = the local time of its tasks).

Adaptations (documented choices, not in the original):

- prompts: fitness is the evaluator's objective for the prompt, normalised so that all-local scores N
  (the scale of the original's sum of ~1 s latencies, so its temperatures keep their meaning); one agent
  per prompt. ``corresult`` generalises to "worse than local for this prompt (latency or energy)";
- local moves: the original SA only moves UEs between servers (min latency rarely wants local there);
  with probability 1/(M+1) a move proposes local instead, so min_energy can trade tx vs local energy;
- deadlines: a row feature T_i / (c_i/f_i) is added; targets a UE cannot reach even alone are masked
  from the network's choice and from SA moves; SA minimises fit + ``deadline_penalty`` x sum_i
  max(0, L_i/T_i - 1) (latencies under equal split from the evaluator), and the decision is the best
  *feasible* state SA visited. The inner loop ("propose until accepted") is capped at
  ``sa_max_tries`` proposals per temperature (the original can spin forever in a local optimum);
- the per-server state feature is F_j / sum F (the released data's columns hold 1/n_j of the
  reference solution, unknown at decision time); the original's sixth output (a relative CPU share,
  whose labels are the equal split anyway) is dropped since the share rule is fixed;
- feasibility: if SA visits no feasible state, all-local with must-offload UEs placed first-fit under
  equal split is used; if even that fails, the same placement with water-filled shares
  (``stats["fallback"] == "water_filling"``), so ARE never returns an infeasible decision when a greedy
  placement exists.
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
    fits_equal,
    fits_optimal,
    reachable_targets,
    seeded_module,
)
from lambo_ray.mec.evaluator import Evaluation, evaluate
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.mec.shares import optimal_shares


@dataclass
class AREConfig:
    hidden: tuple[int, int] = (64, 32)
    lr: float = 1.5
    momentum: float = 0.5
    memory_instances: int = 200  # scenarios kept (x N rows)
    batch_fraction: float = 0.1  # rows per training step = this x memory rows
    epochs: int = 10  # full-batch SGD steps per online step
    sa_t_init: float = 1000.0
    sa_t_min: float = 1.0
    sa_k: float = 0.01
    damp_start: float = 0.85
    damp_end: float = 0.965
    damp_steps: int = 300  # online steps over which the cooling factor rises from damp_start to damp_end
    channel_threshold: float = 1.6  # fth: below it, a move goes to the best channel instead of the roulette
    sa_max_tries: int = 50  # proposals per temperature before giving up on that temperature
    deadline_penalty: float = 100.0
    warmup_steps: int = 300
    online: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("memory_instances", "epochs", "sa_max_tries"):
            if getattr(self, name) < 1:
                raise LamboInputError(f"AREConfig.{name} must be >= 1 (got {getattr(self, name)})", where="config")
        if not 0 < self.batch_fraction <= 1:
            raise LamboInputError(
                f"AREConfig.batch_fraction must be in (0, 1] (got {self.batch_fraction})", where="config"
            )
        if not (0 < self.damp_start < 1 and 0 < self.damp_end < 1):
            raise LamboInputError("AREConfig.damp_start and damp_end must be in (0, 1)", where="config")
        if not 0 < self.sa_t_min < self.sa_t_init:
            raise LamboInputError("AREConfig needs 0 < sa_t_min < sa_t_init", where="config")
        if self.warmup_steps < 0 or self.damp_steps < 0 or self.deadline_penalty < 0:
            raise LamboInputError(
                "AREConfig.warmup_steps, damp_steps and deadline_penalty must be >= 0", where="config"
            )
        self.hidden = tuple(self.hidden)


def are_features(inst: Instance) -> np.ndarray:
    """(N, 3 + 2M) rows: d_i/max d, c_i/max c, T_i/(c_i/f_i), r_ij/max_j r_ij, F_j/sum F."""
    m = inst.n_servers
    return np.column_stack(
        [
            inst.data_bits / inst.data_bits.max(),
            inst.cycles / inst.cycles.max(),
            inst.deadline_s / inst.local_latency(),
            inst.rate_bps / inst.rate_bps.max(axis=1, keepdims=True),
            np.broadcast_to(inst.capacity_cps / inst.capacity_cps.sum(), (inst.n_ues, m)),
        ]
    ).astype(np.float32)


def equal_shares(inst: Instance, target: np.ndarray) -> np.ndarray:
    """ARE's allocation: server j's capacity split equally, 1/n_j to each of its n_j UEs."""
    counts = np.bincount(target, minlength=inst.n_servers + 1)
    return np.where(target > 0, 1.0 / np.maximum(counts[target], 1), 0.0)


class _Fitness:
    """SA's energy for one instance and prompt: normalised objective plus the deadline penalty."""

    def __init__(self, inst: Instance, prompt: str, penalty: float) -> None:
        self.inst, self.prompt, self.penalty = inst, prompt, penalty
        self.local = evaluate(inst, np.zeros(inst.n_ues, dtype=np.int64), np.zeros(inst.n_ues))
        self.scale = inst.n_ues / self.local.objective(prompt)

    def __call__(self, target: np.ndarray) -> tuple[float, Evaluation]:
        ev = evaluate(self.inst, target, equal_shares(self.inst, target))
        excess = np.maximum(ev.latency_s / self.inst.deadline_s - 1.0, 0.0).sum()
        return self.scale * ev.objective(self.prompt) + self.penalty * excess, ev


def refine_to_local(fit: _Fitness, target: np.ndarray) -> np.ndarray:
    """``corresult`` for both prompts: send to local every offloaded UE that does worse than local
    (and meets its deadline there), until none is left. Each pass only improves the objective: the
    moved UEs gain, and the UEs left on their servers get larger equal shares (less latency, same energy)."""
    target = target.copy()
    local_value = fit.local.latency_s if fit.prompt == "min_latency" else fit.local.energy_j
    can_local = fit.inst.local_feasible()
    while True:
        ev = fit(target)[1]
        value = ev.latency_s if fit.prompt == "min_latency" else ev.energy_j
        worse = (target > 0) & can_local & (value > local_value)
        if not worse.any():
            return target
        target[worse] = 0


class _Agent:
    """Per-UE MLP + SGD + row replay memory for one prompt."""

    def __init__(self, cfg: AREConfig, n: int, m: int, seed: int) -> None:
        self.cfg, self.n, self.m = cfg, n, m
        sizes = [3 + 2 * m, *cfg.hidden, m + 1]
        self.net = seeded_module(seed, lambda: _mlp(sizes))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        self.memory = ReplayMemory(cfg.memory_instances * n, sizes[0], ())
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.losses: list[float] = []

    def damp(self) -> float:
        c = self.cfg
        frac = min(self.steps / c.damp_steps, 1.0) if c.damp_steps > 0 else 1.0
        return c.damp_start + (c.damp_end - c.damp_start) * frac

    def act(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            score = self.net(torch.from_numpy(x)).double().numpy()
        return np.where(mask, score, -np.inf).argmax(axis=1)

    def learn(self) -> None:
        rows = len(self.memory)
        batch = max(1, int(self.cfg.batch_fraction * self.memory.size))
        x, y = self.memory.sample(min(batch, rows), self.rng, replace=False)
        xt = torch.from_numpy(x)
        yt = nn.functional.one_hot(torch.from_numpy(y), self.m + 1).float()
        self.net.train()
        for _ in range(self.cfg.epochs):
            loss = 0.5 * ((self.net(xt) - yt) ** 2).sum() / len(x)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        self.losses.append(loss.item())

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "memory": self.memory.state(),
            "steps": self.steps,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.memory.load(state["memory"])
        self.steps = int(state["steps"])
        self.rng.bit_generator.state = state["rng"]


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Sigmoid MLP with DeepLearnToolbox's initialisation (weights and biases uniform in +-4 sqrt(6/(in+out)))."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b)
        r = 4 * np.sqrt(6 / (a + b))
        nn.init.uniform_(lin.weight, -r, r)
        nn.init.uniform_(lin.bias, -r, r)
        layers += [lin, nn.Sigmoid()]
    return nn.Sequential(*layers)


class ARE(OnlineExpert):
    """ARE adapted to both prompts and to deadlines (see module docstring). Same stateful API as DROO:
    ``warmup(instances, prompt)``, ``state_dict``/``load_state_dict``, ``save``/``load``."""

    name = "are"

    def __init__(self, config: AREConfig | None = None) -> None:
        super().__init__()
        self.config = config or AREConfig()

    def _new_agent(self, n: int, m: int, prompt: str) -> _Agent:
        return _Agent(self.config, n, m, seed=self.config.seed * len(PROMPTS) + PROMPTS.index(prompt))

    def anneal(
        self, agent: _Agent, fit: _Fitness, x: np.ndarray, start: np.ndarray, reachable: np.ndarray
    ) -> tuple[np.ndarray | None, int]:
        """SA.m from ``start``; returns the best feasible state visited (None if none) and the number of
        fitness evaluations."""
        cfg, rng, n, m = self.config, agent.rng, fit.inst.n_ues, fit.inst.n_servers
        channel = np.where(reachable[:, 1:], x[:, 3 : 3 + m], 0.0)
        current = start.copy()
        cur_fit, ev = fit(current)
        best, best_obj = (current.copy(), ev.objective(fit.prompt)) if ev.feasible else (None, np.inf)
        evals, temp, damp = 1, cfg.sa_t_init, agent.damp()
        while temp > cfg.sa_t_min:
            for _ in range(cfg.sa_max_tries):
                proposal = current.copy()
                i = int(rng.integers(n))
                if reachable[i, 0] and (rng.random() < 1.0 / (m + 1) or not reachable[i, 1:].any()):
                    proposal[i] = 0
                elif reachable[i, 1:].any():
                    w = channel[i]
                    proposal[i] = 1 + (
                        int(w.argmax()) if w.sum() < cfg.channel_threshold else int(rng.choice(m, p=w / w.sum()))
                    )
                new_fit, ev = fit(proposal)
                evals += 1
                d = new_fit - cur_fit
                if d < 0 or rng.random() < np.exp(-d / (cfg.sa_k * temp)):
                    current, cur_fit = proposal, new_fit
                    if ev.feasible and ev.objective(fit.prompt) < best_obj:
                        best, best_obj = current.copy(), ev.objective(fit.prompt)
                    break
            temp *= damp
        return best, evals

    def _step(self, agent: _Agent, inst: Instance, prompt: str, learn: bool):
        x, reachable = are_features(inst), reachable_targets(inst)
        fit = _Fitness(inst, prompt, self.config.deadline_penalty)
        start = agent.act(x, reachable)
        refined, evals = self.anneal(agent, fit, x, start, reachable)
        fallback: str | bool = False
        if refined is not None:
            target = refine_to_local(fit, refined)
            share = equal_shares(inst, target)
        else:
            target, share, fallback = self._fallback(inst)
        if learn:
            agent.memory.add(x, target)
            agent.learn()
            agent.steps += 1
        stats = {"fallback": fallback, "sa_evaluations": evals, "damp": agent.damp()}
        return target, share, stats

    @staticmethod
    def _fallback(inst: Instance) -> tuple[np.ndarray, np.ndarray, str]:
        target = fallback_assignment(inst, fits_equal)
        if target is not None:
            return target, equal_shares(inst, target), "equal_split"
        target = fallback_assignment(inst, fits_optimal)
        share = None if target is None else optimal_shares(inst, target)
        if share is not None:
            return target, share, "water_filling"
        zeros = np.zeros(inst.n_ues, dtype=np.int64)  # nothing found: all-local, reported infeasible
        return zeros, np.zeros(inst.n_ues), "none_feasible"


@register("are")
def make_are(seed: int = 0, checkpoint: str | None = None, **overrides: Any) -> ARE:
    """``get_expert("are", seed=..., warmup_steps=..., checkpoint=PATH)``: an ARE expert, optionally loaded."""
    expert = ARE(config_from(AREConfig, seed=seed, **overrides))
    if checkpoint is not None:
        expert.load(checkpoint)
    return expert
