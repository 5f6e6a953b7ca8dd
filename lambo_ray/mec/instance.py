"""In-memory instance and decision: numpy arrays in SI units, the only representation methods see.

Files and HTTP bodies are converted to these by :mod:`lambo_ray.mec.io`, which validates them first,
so everything downstream may assume finite, positive, correctly shaped arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lambo_ray.errors import LamboInputError

Prompt = Literal["min_latency", "min_energy"]
PROMPTS: tuple[str, ...] = ("min_latency", "min_energy")
LOCAL = 0  # target value meaning "run on the UE itself"


def check_prompt(prompt: str) -> str:
    if prompt not in PROMPTS:
        raise LamboInputError(f"unknown prompt {prompt!r}; expected one of {', '.join(PROMPTS)}", where="prompt")
    return prompt


@dataclass(frozen=True)
class Instance:
    """One MEC cell at one moment: N UEs with one task each, M edge servers.

    Arrays are indexed by UE ``i`` and server ``j`` (0-based here; in decisions server j is target j+1).
    """

    data_bits: np.ndarray  # d_i, (N,)
    cycles: np.ndarray  # c_i, (N,)
    deadline_s: np.ndarray  # T_i, (N,)
    local_cps: np.ndarray  # f_i, (N,)
    rate_bps: np.ndarray  # r_ij, (N, M)
    capacity_cps: np.ndarray  # F_j, (M,)
    tx_w: float = 1.0
    local_w: float = 1.0
    geometry: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def n_ues(self) -> int:
        return int(self.cycles.shape[0])

    @property
    def n_servers(self) -> int:
        return int(self.capacity_cps.shape[0])

    # Derived quantities every method needs; cheap, so recomputed rather than cached.
    def local_latency(self) -> np.ndarray:
        return self.cycles / self.local_cps

    def tx_latency(self) -> np.ndarray:
        """d_i / r_ij, (N, M)."""
        return self.data_bits[:, None] / self.rate_bps

    def min_share(self) -> np.ndarray:
        """a_min_ij = c_i / (F_j (T_i - d_i/r_ij)); +inf where offloading to j cannot meet the deadline."""
        slack = self.deadline_s[:, None] - self.tx_latency()
        with np.errstate(divide="ignore", invalid="ignore"):
            a = self.cycles[:, None] / (self.capacity_cps[None, :] * slack)
        return np.where(slack > 0, a, np.inf)

    def local_feasible(self) -> np.ndarray:
        return self.local_latency() <= self.deadline_s


@dataclass
class Decision:
    """Where each task runs (0 = local, j = server j) and the share of F_j it gets (0 when local)."""

    target: np.ndarray  # (N,) int
    share: np.ndarray  # (N,) float
    prompt: str
    method: str
    objective: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = np.asarray(self.target, dtype=np.int64)
        self.share = np.asarray(self.share, dtype=np.float64)
