"""Input features of the policy (the static part of the IE): UE, server and UE-server pair tokens.

Every feature is scale-free: a log-ratio or a ratio against a quantity of the same instance (the
UE's own deadline, the instance's mean task, the total capacity) or a dimensionless flag. So one
model serves any N and M, and drifted instances (heavier tasks, a server in outage, tighter
deadlines) move features along meaningful axes instead of off the training range. Nothing here
is an objective: the evaluator stays the only place latency and energy are scored; these are
the raw ratios a human expert would look at (can it run locally? which servers can meet its
deadline, with which minimum share a_min_ij?).

Batches are padded to (n_max, m_max); padded UEs/servers carry zero features, ``+inf`` minimum
shares and False masks, and the model never lets them influence a real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Instance, check_prompt
from lambo_ray.mec.packing import Packing, pack_must_offload

FEATURE_VERSION = 2  # 2: decode order, reservations, latency-marginal inputs, spare-fraction shares
PROMPT_IDS: dict[str, int] = {"min_latency": 0, "min_energy": 1}

UE_FEATURES: tuple[str, ...] = (
    "log_local_latency_over_deadline",  # <= 0 iff local execution meets the deadline
    "local_ok",
    "log_deadline_over_median",
    "log_cycles_over_mean",
    "log_data_over_mean",
    "log_local_cps_over_mean",
    "log_cycles_over_total_capacity_deadline",  # share of the whole cell's CPU the task needs
    "log_cell_load",  # sum_i c_i / T_i over sum_j F_j: one value per instance, on every UE token
    "log_best_min_share",
    "fraction_servers_reachable",
    "log_best_tx_energy_over_local_energy",
)
SERVER_FEATURES: tuple[str, ...] = (
    "log_capacity_over_mean",
    "capacity_over_total",
    "log_capacity_over_max",
    "log_mean_tasks_per_median_deadline",  # F_j * median(T) / mean(c)
    "fraction_ues_reachable",
)
PAIR_FEATURES: tuple[str, ...] = (
    "log_tx_time_over_deadline",
    "min_share_clipped",  # a_min_ij clipped to [0, 2]; 2 where unreachable
    "log_min_share",
    "reachable",  # a_min_ij <= 1
    "log_rate_over_geomean",
    "log_tx_energy_over_local_energy",
    "log_whole_server_latency_over_deadline",  # (d/r + c/F_j) / T_i
    "log_min_share_over_best",  # 0 for the UE's easiest server
)
UE_DIM, SERVER_DIM, PAIR_DIM = len(UE_FEATURES), len(SERVER_FEATURES), len(PAIR_FEATURES)

_LOG_CLIP = 10.0  # logs of ratios are clipped to [-10, 10]: e^10 ~ 2e4, far outside any real cell
_UNREACHABLE_LOG_SHARE = 3.0  # stands for log(a_min) of an impossible pair (> log 2)


def _clog(x: np.ndarray) -> np.ndarray:
    """log(x) clipped to [-_LOG_CLIP, _LOG_CLIP]; NaN (0/0, inf/inf) counts as +_LOG_CLIP.

    ``fmin`` replaces NaN by its other argument, so two ufuncs do what nan_to_num + clip did at a
    fifth of the cost (17 calls per instance made them a quarter of featurisation)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(np.fmin(np.log(x), _LOG_CLIP), -_LOG_CLIP)


@dataclass
class InstanceFeatures:
    """Unpadded numpy features of one instance."""

    ue: np.ndarray  # (N, UE_DIM)
    server: np.ndarray  # (M, SERVER_DIM)
    pair: np.ndarray  # (N, M, PAIR_DIM)
    amin: np.ndarray  # (N, M), +inf where unreachable
    local_ok: np.ndarray  # (N,) bool
    reserve: np.ndarray  # (N, M) minimum share a must-offload UE holds on its planned server, else 0
    # Quantities the decoder's dynamic state is built from (relative, so size-free):
    energy_ratio: np.ndarray  # (N, M) UE energy offloaded to j / locally
    lat_base: np.ndarray  # (N, M) (upload + compute on a whole server j) / local latency
    sqrt_work: np.ndarray  # (N, M) sqrt(compute time on a whole server j / mean local latency)
    local_lat: np.ndarray  # (N,) local latency / mean local latency


def instance_features(inst: Instance, packing: Packing | None = None) -> InstanceFeatures:
    """Vectorised features of one instance (see the *_FEATURES tuples for the columns), and the
    capacity its must-offload UEs reserve (``packing``: computed here when not given)."""
    c, d, t, f = inst.cycles, inst.data_bits, inst.deadline_s, inst.local_cps
    cap = inst.capacity_cps
    local_lat = inst.local_latency()
    tx = inst.tx_latency()  # (N, M)
    amin = inst.min_share()  # (N, M), +inf where the deadline cannot be met on j
    reach = amin <= 1.0
    best_amin = amin.min(axis=1)
    local_e = inst.local_w * local_lat
    tx_e = inst.tx_w * tx
    t_med = float(np.median(t))
    cap_sum = float(cap.sum())

    ue = np.stack(
        [
            _clog(local_lat / t),
            (local_lat <= t).astype(float),
            _clog(t / t_med),
            _clog(c / c.mean()),
            _clog(d / d.mean()),
            _clog(f / f.mean()),
            _clog(c / (cap_sum * t)),
            np.full(c.shape, _clog(np.array((c / t).sum() / cap_sum))[()]),
            np.where(np.isfinite(best_amin), _clog(best_amin), _UNREACHABLE_LOG_SHARE),
            reach.mean(axis=1),
            _clog(tx_e.min(axis=1) / local_e),
        ],
        axis=-1,
    )
    server = np.stack(
        [
            _clog(cap / cap.mean()),
            cap / cap_sum,
            _clog(cap / cap.max()),
            _clog(cap * t_med / c.mean()),
            reach.mean(axis=0),
        ],
        axis=-1,
    )
    log_rate = np.log(inst.rate_bps)
    finite = np.isfinite(amin)
    with np.errstate(invalid="ignore"):
        amin_over_best = amin / best_amin[:, None]  # inf/inf where no server is reachable
    pair = np.stack(
        [
            _clog(tx / t[:, None]),
            np.clip(np.where(finite, amin, 2.0), 0.0, 2.0),
            np.where(finite, np.minimum(_clog(amin), _UNREACHABLE_LOG_SHARE), _UNREACHABLE_LOG_SHARE),
            reach.astype(float),
            np.clip(log_rate - log_rate.mean(), -_LOG_CLIP, _LOG_CLIP),
            _clog(tx_e / local_e[:, None]),
            _clog((tx + c[:, None] / cap[None, :]) / t[:, None]),
            np.where(finite, _clog(amin_over_best), _LOG_CLIP),
        ],
        axis=-1,
    )
    packing = pack_must_offload(inst) if packing is None else packing
    work = c[:, None] / cap[None, :]
    mean_lat = float(local_lat.mean())
    return InstanceFeatures(
        ue=ue,
        server=server,
        pair=pair,
        amin=amin,
        local_ok=inst.local_feasible(),
        reserve=packing.reserve(amin),
        energy_ratio=tx_e / local_e[:, None],
        lat_base=(tx + work) / local_lat[:, None],
        sqrt_work=np.sqrt(work / mean_lat),
        local_lat=local_lat / mean_lat,
    )


def decode_order(f: InstanceFeatures, prompt_id: int) -> np.ndarray:
    """The order the decoder decides UEs in: those that must offload first (hardest, i.e. largest smallest
    minimum share, first), then by the gain of offloading alone (energy or latency saved relative to
    local, on the best reachable server), largest first. Deciding the most constrained and most valuable
    UEs first is what a good greedy does; it makes each step's decision far more local than in index
    order (measured: 12% -> 5% greedy gap on min_energy after the same imitation budget)."""
    reach = np.isfinite(f.amin) & (f.amin <= 1.0)
    gain = 1.0 - (f.energy_ratio if prompt_id == PROMPT_IDS["min_energy"] else f.lat_base)
    best = np.where(reach, gain, -np.inf).max(axis=1, initial=-np.inf)
    best = np.where(np.isfinite(best), best, -10.0)
    hard = np.where(np.isfinite(f.amin), f.amin, 9.0).min(axis=1, initial=9.0)
    key = np.where(f.local_ok, best, 10.0 + hard)
    return np.argsort(-key, kind="stable")


@dataclass
class PolicyBatch:
    """A padded batch of instances as the policy sees them (all torch tensors, leading dim B).

    ``amin`` is float64 on purpose: shares are built as ``a_min + u (remaining - a_min)`` and the
    remaining capacity is ``1 - cumsum(shares)``, so the constraint guarantees and the
    decode/teacher-forcing log-prob agreement need more than float32's 7 digits.
    """

    ue: torch.Tensor  # (B, N, UE_DIM) float32
    server: torch.Tensor  # (B, M, SERVER_DIM) float32
    pair: torch.Tensor  # (B, N, M, PAIR_DIM) float32
    amin: torch.Tensor  # (B, N, M) float64, +inf where unreachable or padded
    reserve: torch.Tensor  # (B, N, M) float64, capacity held by must-offload UEs (lambo_ray.policy.masks)
    lat_base: torch.Tensor  # (B, N, M) float64, see InstanceFeatures
    sqrt_work: torch.Tensor  # (B, N, M) float64
    local_lat: torch.Tensor  # (B, N) float64
    local_ok: torch.Tensor  # (B, N) bool
    ue_mask: torch.Tensor  # (B, N) bool
    server_mask: torch.Tensor  # (B, M) bool
    prompt: torch.Tensor  # (B,) long
    order: torch.Tensor  # (B, N) long: position p holds the instance's UE order[p] (decode_order)

    @property
    def batch_size(self) -> int:
        return int(self.ue.shape[0])

    @property
    def n_max(self) -> int:
        return int(self.ue.shape[1])

    @property
    def m_max(self) -> int:
        return int(self.server.shape[1])

    def to_instance_order(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) values per decode position -> per UE of the instance (inverse of ``order``)."""
        idx = self.order.reshape(*self.order.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.zeros_like(x).scatter_(1, idx, x)

    def to_decode_order(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) values per UE of the instance -> per decode position."""
        idx = self.order.reshape(*self.order.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, idx)

    def to(self, device: torch.device | str) -> PolicyBatch:
        return PolicyBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: Any) -> PolicyBatch:
        """Rows ``idx`` (int, slice, list or tensor) of every field; an int keeps the batch dim."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return PolicyBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Fixed-dtype numpy arrays for an RLlib observation (float32 everywhere, masks 0/1,
        prompt int64). ``amin`` is rounded *up* to float32 so a share built from it still meets
        the deadline; ``+inf`` is kept (a Box(-inf, inf) observation space holds it)."""
        amin = self.amin.detach().cpu().numpy()
        amin32 = amin.astype(np.float32)
        amin32 = np.where(amin32 < amin, np.nextafter(amin32, np.float32(np.inf)), amin32)
        return {
            "ue": self.ue.detach().cpu().numpy().astype(np.float32),
            "server": self.server.detach().cpu().numpy().astype(np.float32),
            "pair": self.pair.detach().cpu().numpy().astype(np.float32),
            "amin": amin32.astype(np.float32),
            "reserve": self.reserve.detach().cpu().numpy().astype(np.float32),
            "lat_base": self.lat_base.detach().cpu().numpy().astype(np.float32),
            "sqrt_work": self.sqrt_work.detach().cpu().numpy().astype(np.float32),
            "local_lat": self.local_lat.detach().cpu().numpy().astype(np.float32),
            "order": self.order.detach().cpu().numpy().astype(np.int64),
            "local_ok": self.local_ok.detach().cpu().numpy().astype(np.float32),
            "ue_mask": self.ue_mask.detach().cpu().numpy().astype(np.float32),
            "server_mask": self.server_mask.detach().cpu().numpy().astype(np.float32),
            "prompt": self.prompt.detach().cpu().numpy().astype(np.int64),
        }

    @classmethod
    def from_tensor_dict(cls, d: dict[str, Any]) -> PolicyBatch:
        """Inverse of :meth:`to_numpy_dict`; accepts numpy arrays or tensors of any float/int dtype."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise LamboInputError(f"policy observation lacks field(s) {', '.join(missing)}", where="observation")
        t = {k: torch.as_tensor(d[k]) for k in (f.name for f in fields(cls))}
        return cls(
            ue=t["ue"].float(),
            server=t["server"].float(),
            pair=t["pair"].float(),
            amin=t["amin"].double(),
            reserve=t["reserve"].double(),
            lat_base=t["lat_base"].double(),
            sqrt_work=t["sqrt_work"].double(),
            local_lat=t["local_lat"].double(),
            local_ok=t["local_ok"] > 0.5 if t["local_ok"].dtype != torch.bool else t["local_ok"],
            ue_mask=t["ue_mask"] > 0.5 if t["ue_mask"].dtype != torch.bool else t["ue_mask"],
            server_mask=t["server_mask"] > 0.5 if t["server_mask"].dtype != torch.bool else t["server_mask"],
            prompt=t["prompt"].reshape(-1).long(),
            order=t["order"].long(),
        )


def prompt_ids(prompts: str | Sequence[str], count: int) -> np.ndarray:
    if isinstance(prompts, str):
        prompts = [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise LamboInputError(f"{len(prompts)} prompts given for {count} instances", where="prompt")
    return np.array([PROMPT_IDS[check_prompt(p)] for p in prompts], dtype=np.int64)


def featurize(
    instances: Sequence[Instance],
    prompts: str | Sequence[str],
    n_max: int | None = None,
    m_max: int | None = None,
    packings: Sequence[Packing] | None = None,
) -> PolicyBatch:
    """Pad and stack the features of ``instances`` (one prompt for all, or one per instance).

    ``packings``: the must-offload plan of each instance (:func:`lambo_ray.mec.packing.pack_must_offload`
    when omitted; imitation passes the label's own assignment, :func:`label_packing`, so the label is
    always an allowed path of the decoder).
    """
    if len(instances) == 0:
        raise LamboInputError("no instances to featurize", where="instances")
    pid = prompt_ids(prompts, len(instances))
    if packings is None:
        packings = [None] * len(instances)
    feats = [instance_features(inst, pk) for inst, pk in zip(instances, packings)]
    return collate(feats, pid, n_max, m_max)


def collate(
    feats: Sequence[InstanceFeatures], prompt_id: np.ndarray, n_max: int | None = None, m_max: int | None = None
) -> PolicyBatch:
    """Pad and stack precomputed :class:`InstanceFeatures` (training reuses them every epoch), every
    instance's UEs in its :func:`decode_order` for its prompt."""
    n_big = max(f.ue.shape[0] for f in feats)
    m_big = max(f.server.shape[0] for f in feats)
    n_max = n_big if n_max is None else n_max
    m_max = m_big if m_max is None else m_max
    if n_big > n_max or m_big > m_max:
        raise LamboInputError(
            f"instance with {n_big} UEs / {m_big} servers exceeds the padding ({n_max}, {m_max})", where="instances"
        )
    b = len(feats)
    prompt_id = np.asarray(prompt_id, dtype=np.int64)
    arr = {
        "ue": np.zeros((b, n_max, UE_DIM), np.float32),
        "server": np.zeros((b, m_max, SERVER_DIM), np.float32),
        "pair": np.zeros((b, n_max, m_max, PAIR_DIM), np.float32),
        "amin": np.full((b, n_max, m_max), np.inf),
        "reserve": np.zeros((b, n_max, m_max)),
        "lat_base": np.ones((b, n_max, m_max)),
        "sqrt_work": np.zeros((b, n_max, m_max)),
        "local_lat": np.ones((b, n_max)),
        "local_ok": np.zeros((b, n_max), bool),
        "ue_mask": np.zeros((b, n_max), bool),
        "server_mask": np.zeros((b, m_max), bool),
        "order": np.tile(np.arange(n_max, dtype=np.int64), (b, 1)),
    }
    for k, f in enumerate(feats):
        n, m = f.ue.shape[0], f.server.shape[0]
        o = decode_order(f, int(prompt_id[k]))
        arr["order"][k, :n] = o
        arr["ue"][k, :n], arr["server"][k, :m], arr["pair"][k, :n, :m] = f.ue[o], f.server, f.pair[o]
        arr["amin"][k, :n, :m], arr["reserve"][k, :n, :m] = f.amin[o], f.reserve[o]
        arr["lat_base"][k, :n, :m], arr["sqrt_work"][k, :n, :m] = f.lat_base[o], f.sqrt_work[o]
        arr["local_lat"][k, :n], arr["local_ok"][k, :n] = f.local_lat[o], f.local_ok[o]
        arr["ue_mask"][k, :n], arr["server_mask"][k, :m] = True, True
    return PolicyBatch(**{k: torch.from_numpy(v) for k, v in arr.items()}, prompt=torch.from_numpy(prompt_id))


def label_packing(inst: Instance, target: np.ndarray) -> Packing | None:
    """The packing a labelled decision itself uses for the must-offload UEs (None when the label leaves
    one of them local, i.e. is infeasible: the instance's own packing is used then)."""
    must = ~inst.local_feasible()
    target = np.asarray(target, dtype=np.int64)
    if np.any(must & (target == 0)):
        return None
    plan = np.where(must, target - 1, -1).astype(np.int64)
    return Packing(plan, must, "label")
