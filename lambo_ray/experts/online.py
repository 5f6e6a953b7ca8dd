"""What the two learning baselines (DROO, ARE) share: they learn *while* they decide.

Both keep, per prompt, a small network, a FIFO replay memory of (features, best decision found)
pairs and a training schedule; each call of ``solve`` is one step of their online loop (decide,
remember, maybe train). :class:`OnlineExpert` holds that state, fixes the cell shape (N, M) the
networks were built for, warms itself up on a generated stream when it meets a prompt for the first
time, and saves/loads everything for reuse. Subclasses supply the agent (network + one online step).
"""

from __future__ import annotations

import io
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.base import Expert, make_decision
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.io import atomic_write_bytes
from lambo_ray.mec.scenario import ScenarioConfig

# fits(a_min of the UEs on one server) -> can that server host them all under the method's share rule?
FitRule = Callable[[np.ndarray], bool]


class ReplayMemory:
    """Fixed-size FIFO memory of (input, label) rows; once full the oldest row is overwritten (DROO's
    ``remember``, ARE's FIFO buffer)."""

    def __init__(self, size: int, x_dim: int, y_shape: tuple[int, ...], y_dtype: type = np.int64) -> None:
        if size < 1:
            raise LamboInputError(f"memory size must be >= 1 (got {size})", where="config")
        self.x = np.zeros((size, x_dim), dtype=np.float32)
        self.y = np.zeros((size, *y_shape), dtype=y_dtype)
        self.count = 0  # rows ever stored

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def __len__(self) -> int:
        return min(self.count, self.size)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Store rows (x: (B, x_dim), y: (B, ...)) in FIFO order."""
        for xi, yi in zip(np.atleast_2d(x), y.reshape(-1, *self.y.shape[1:])):
            self.x[self.count % self.size] = xi
            self.y[self.count % self.size] = yi
            self.count += 1

    def sample(self, batch: int, rng: np.random.Generator, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        idx = rng.choice(n, size=batch if replace else min(batch, n), replace=replace)
        return self.x[idx], self.y[idx]

    def state(self) -> dict[str, Any]:
        """Tensors, not numpy arrays: checkpoints are read with ``torch.load(weights_only=True)``, which
        refuses anything but tensors and plain values."""
        return {"x": torch.tensor(self.x), "y": torch.tensor(self.y), "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        x, y = np.asarray(state["x"]), np.asarray(state["y"])
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise LamboInputError(
                "replay memory in the checkpoint does not match the configured size", where="checkpoint"
            )
        self.x[:], self.y[:], self.count = x, y, int(state["count"])


def scenario_like(inst: Instance) -> ScenarioConfig:
    """A scenario of the same shape as ``inst``, for warm-up streams when only a file is given.

    Taken from the instance: N, M, capacities, powers, local speed, area (from the geometry if stored),
    mean task size and data size (sample means: the generator draws uniform around the mean) and the
    deadline factor range (min/max of T_i f_i / c_i). Everything else is the paper default.
    """
    ratio = inst.deadline_s * inst.local_cps / inst.cycles
    lo, hi = float(ratio.min()), float(ratio.max())
    area = (inst.geometry or {}).get("area_m", ScenarioConfig.area_m)
    return ScenarioConfig(
        n_ues=inst.n_ues,
        n_servers=inst.n_servers,
        capacities_cps=tuple(float(c) for c in inst.capacity_cps),
        tx_w=float(inst.tx_w),
        local_w=float(inst.local_w),
        local_cps=float(np.median(inst.local_cps)),
        area_m=float(area),
        mean_cycles=float(inst.cycles.mean()),
        mean_data_bits=float(inst.data_bits.mean()),
        deadline_factor=(min(lo, 1.0) if lo < 1.0 else 1.0, max(hi, 1.0)),
    )


def fallback_assignment(inst: Instance, fits: FitRule) -> np.ndarray | None:
    """All-local, with the UEs that cannot meet their deadline locally placed first-fit decreasing
    (largest smallest-minimum-share first, each on its cheapest server that still fits).

    ``fits`` says whether a server can host a set of UEs under the method's share rule. Returns None
    when the greedy placement fails (the decision is then not guaranteed).
    """
    target = np.zeros(inst.n_ues, dtype=np.int64)
    must = np.flatnonzero(~inst.local_feasible())
    if must.size == 0:
        return target
    a_min = inst.min_share()
    for i in must[np.argsort(-a_min[must].min(axis=1), kind="stable")]:
        for j in np.argsort(a_min[i], kind="stable"):
            members = np.append(np.flatnonzero(target == j + 1), i)
            if np.isfinite(a_min[i, j]) and fits(a_min[members, j]):
                target[i] = j + 1
                break
        else:
            return None
    return target


def reachable_targets(inst: Instance) -> np.ndarray:
    """(N, M+1) bool: local meets UE i's deadline / server j alone (share 1) meets it."""
    return np.column_stack([inst.local_feasible(), inst.min_share() <= 1.0])


def fits_optimal(a_min: np.ndarray) -> bool:
    """Water-filled shares exist iff the minimum shares fit in one server."""
    return bool(a_min.sum() <= 1.0)


def fits_equal(a_min: np.ndarray) -> bool:
    """Equal split 1/n meets every deadline iff n * max a_min <= 1."""
    return bool(a_min.size * a_min.max() <= 1.0)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded for the duration: these networks are tiny, and intra-op threads only
    add contention on a shared CPU (measured: ~10x slower warm-up under load). Restores the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class OnlineExpert(Expert):
    """An expert that learns online, one agent per prompt, all built for one cell shape (N, M).

    The networks' input and output widths depend on N and M (as in DROO and ARE), so a trained model
    serves exactly one (N, M): the first instance (or a loaded state) fixes it, and an instance of
    another shape raises :class:`LamboInputError` rather than being silently resized.
    """

    config: Any

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None
        self.agents: dict[str, Any] = {}
        self.counters = {"steps": 0, "fallbacks": 0, "warmup_steps": 0}

    # --- hooks -----------------------------------------------------------------------------
    @abstractmethod
    def _new_agent(self, n: int, m: int, prompt: str) -> Any:
        """A freshly initialised agent (network, optimiser, memory) for this shape and prompt."""

    @abstractmethod
    def _step(self, agent: Any, inst: Instance, prompt: str, learn: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        """One online step: decide (target, share, stats) and, if ``learn``, remember and train."""

    # --- public API ------------------------------------------------------------------------
    def check_shape(self, inst: Instance) -> None:
        shape = (inst.n_ues, inst.n_servers)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise LamboInputError(
                f"{self.name} was built for N={self.shape[0]} UEs and M={self.shape[1]} servers; this instance "
                f"has N={shape[0]}, M={shape[1]} (its network's input width is fixed: train one model per cell "
                f"shape)",
                where="instance",
            )

    def agent(self, prompt: str) -> Any:
        if self.shape is None:
            raise LamboInputError(f"{self.name}: no cell shape yet (call warmup or solve first)")
        if prompt not in self.agents:
            self.agents[prompt] = self._new_agent(*self.shape, prompt)
        return self.agents[prompt]

    def warmup(self, instances: list[Instance], prompt: str) -> list[float]:
        """Run the online loop (decide, remember, train) over a stream; returns each step's objective."""
        objectives = []
        with single_thread():
            for inst in instances:
                objectives.append(self._warmup_step(inst, prompt))
        return objectives

    def _warmup_step(self, inst: Instance, prompt: str) -> float:
        self.check_shape(inst)
        target, share, _ = self._step(self.agent(prompt), inst, prompt, learn=True)
        self.counters["warmup_steps"] += 1
        return make_decision(inst, target, share, prompt, self.name, {}).objective

    def _solve(self, inst: Instance, prompt: str, time_limit: float | None):
        self.check_shape(inst)
        warm: dict[str, Any] = {}
        if prompt not in self.agents and self.config.warmup_steps > 0:
            start = time.perf_counter()
            self.warmup(generate_many(scenario_like(inst), self.config.warmup_steps, seed=self.warmup_seed()), prompt)
            warm = {
                "auto_warmup_steps": self.config.warmup_steps,
                "auto_warmup_s": time.perf_counter() - start,
            }
        with single_thread():
            target, share, stats = self._step(self.agent(prompt), inst, prompt, learn=self.config.online)
        self.counters["steps"] += 1
        self.counters["fallbacks"] += int(bool(stats.get("fallback", False)))
        return target, share, {**stats, **warm}

    def warmup_seed(self) -> int:
        """Seed of the generated warm-up stream: derived from, never equal to, the config seed, so a file
        generated with ``--seed 0`` is not replayed as training data for a method run with seed 0."""
        return int(np.random.SeedSequence([self.config.seed, 0x3A1D]).generate_state(1)[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": asdict(self.config),
            "shape": self.shape,
            "agents": {p: a.state_dict() for p, a in self.agents.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise LamboInputError(
                f"checkpoint is for method {state.get('method')!r}, not {self.name!r}", where="checkpoint"
            )
        self.shape = tuple(state["shape"]) if state["shape"] is not None else None
        self.agents = {}
        for prompt, agent_state in state["agents"].items():
            self.agent(prompt).load_state_dict(agent_state)
        self.counters.update(state.get("counters", {}))

    def save(self, path: str | Path) -> None:
        """Write the state atomically: a complete new file replaces the old one, or the old one stays."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    def load(self, path: str | Path) -> None:
        """Read a state written by :meth:`save`. Only tensors and plain values are unpickled
        (``weights_only=True``): a crafted file cannot run code, it is refused as unreadable."""
        path = Path(path)
        if not path.is_file():
            raise LamboInputError(f"checkpoint file not found: {path}", where="checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (any unreadable or unsafe file is a user error here)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise LamboInputError(
                f"cannot read {path} as a {self.name} checkpoint (only tensors and plain values are loaded): {first}",
                where="checkpoint",
            ) from None
        if not isinstance(state, dict):
            raise LamboInputError(f"{path} does not hold a {self.name} checkpoint", where="checkpoint")
        self.load_state_dict(state)


def config_from(cls: type, **values: Any) -> Any:
    """Build a config dataclass from keyword values, naming unknown keys as a user error."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise LamboInputError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}", where="config")
    return cls(**values)


def seeded_module(seed: int, build: Any) -> Any:
    """Build a torch module with its own seed, leaving the global RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()
