"""One labeller: the exact expert with a time limit, and cheaper experts to fall back on.

The exact expert (Pyomo + HiGHS) proves optimality of ``min_energy`` labels in ~0.1 s, but
``min_latency`` (outer approximation) can take tens of seconds at N = 50. Under a time limit it
returns its incumbent with a certified gap against its lower bound. That incumbent is kept as is
when the gap is already small (``accept_gap``); otherwise the fallbacks run and the best feasible
decision wins, its gap still certified against exact's bound:

* ``ils`` (:class:`IteratedLocalSearch`: greedy, then descent over moves, swaps and ejection chains
  and a few perturbation rounds, optimal shares): within ~0.02 % of optimal on ``min_latency`` where
  it could be checked, in well under a second; the same engine as the policy's ``search`` decode,
  started from the greedy heuristic instead of the policy's proposals;
* ``local_search`` (greedy + single-UE moves and swaps): ~0.04 % above optimal on ``min_latency`` and
  ~0.3 % on ``min_energy`` at N = 50, in milliseconds;
* ``de`` (differential evolution seeded with all-local and greedy): ~0.1 % on both, in seconds.

Any registered expert name works as a fallback too.

:class:`LabelWorker` is a plain class (the pool wraps it as a Ray actor), so it runs without Ray.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambo_ray.alef.labels import Label, LabellingError, certified_gap
from lambo_ray.experts.base import Expert
from lambo_ray.mec.instance import Decision, Instance


@dataclass
class LabelWorkerConfig:
    """What one actor runs. Expert names go through the expert registry."""

    primary: str = "exact"
    fallbacks: tuple[str, ...] = ("ils", "local_search", "de")
    primary_kwargs: dict[str, Any] = field(default_factory=dict)
    # A DE label is worth the best DE can do: start its population from all-local and greedy.
    fallback_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"de": {"init": "seeded"}})
    # An exact incumbent certified within this relative gap is kept without running the fallbacks:
    # none of them can improve it by more than its gap.
    accept_gap: float = 1e-3
    # Builds the primary expert instead of ``primary`` (a configured solver object, or a scripted
    # expert in tests); pickled to the actors, so it must be picklable by cloudpickle.
    primary_factory: Callable[[], Expert] | None = None

    @property
    def experts_per_label(self) -> int:
        """How many experts one label may run one after the other, each under the time limit."""
        return 1 + len(self.fallbacks)


class IteratedLocalSearch(Expert):
    """Greedy start, descent over moves, swaps and ejection chains, then ``kicks`` perturbation rounds
    (:func:`lambo_ray.experts.ils.iterated_local_search`), latency-optimal shares. Deterministic for
    its seed unless the time limit cuts the perturbations short."""

    name = "ils"

    def __init__(self, kicks: int = 8, seed: int = 0) -> None:
        self.kicks, self.seed = kicks, seed

    def _solve(
        self, inst: Instance, prompt: str, time_limit: float | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from lambo_ray.experts.heuristics import greedy_assignment
        from lambo_ray.experts.ils import iterated_local_search
        from lambo_ray.experts.placement import build_tables
        from lambo_ray.mec.shares import optimal_shares

        tables = build_tables(inst, prompt)
        start = greedy_assignment(tables)[0].target
        res = iterated_local_search(
            tables, [("greedy", start)], np.random.default_rng(self.seed), self.kicks, time_limit
        )
        share = None if res is None else optimal_shares(inst, res.target)
        if res is None or share is None:
            raise LabellingError("iterated local search found no feasible decision")
        return res.target, share, {"status": "time_limit" if res.budget_hit else "heuristic", "kicks": res.kicks}


# Fallbacks built here rather than taken from the expert registry.
BUILTIN_FALLBACKS: dict[str, Callable[..., Expert]] = {"ils": IteratedLocalSearch}


def fallback_names() -> list[str]:
    """Every name a fallback may have: the built-in ones and the registered experts."""
    from lambo_ray.experts import available_methods

    return sorted(set(BUILTIN_FALLBACKS) | set(available_methods()))


class LabelWorker:
    """Labels one instance at a time: primary expert, then fallbacks if the primary proved nothing."""

    def __init__(self, cfg: LabelWorkerConfig) -> None:
        from lambo_ray.experts import get_expert

        self.cfg = cfg
        self._get_expert = get_expert
        self.primary = cfg.primary_factory() if cfg.primary_factory else get_expert(cfg.primary, **cfg.primary_kwargs)
        self._fallbacks: dict[str, Expert] = {}  # built on first use: most labels never need them

    def pid(self) -> int:
        return os.getpid()

    def fallback(self, name: str) -> Expert:
        if name not in self._fallbacks:
            build = BUILTIN_FALLBACKS.get(name, lambda **kw: self._get_expert(name, **kw))
            self._fallbacks[name] = build(**self.cfg.fallback_kwargs.get(name, {}))
        return self._fallbacks[name]

    def label(self, instance_id: int, inst: Instance, prompt: str, time_limit: float | None, attempt: int = 1) -> Label:
        start = time.perf_counter()
        exact: Decision | None = None
        try:
            exact = self.primary.solve(inst, prompt, time_limit)
            status = str(exact.stats.get("status"))
        except Exception as err:  # a solver crash must not lose the label: the fallbacks still can
            status = f"error: {type(err).__name__}: {err}"
        lower_bound = None if exact is None else exact.stats.get("lower_bound")
        usable = exact is not None and bool(exact.stats.get("feasible")) and math.isfinite(exact.objective)
        if usable and exact.stats.get("proven_optimal"):
            return self._make(instance_id, prompt, exact, "exact", lower_bound, status, start, attempt)
        best, source = (exact, "exact_time_limit") if usable else (None, "")
        gap = None if best is None else certified_gap(best.objective, lower_bound)
        if gap is not None and gap <= self.cfg.accept_gap:
            return self._make(instance_id, prompt, best, source, lower_bound, status, start, attempt)
        errors: list[str] = []
        for name in self.cfg.fallbacks:
            try:
                d = self.fallback(name).solve(inst, prompt, time_limit)
            except Exception as err:
                errors.append(f"{name}: {type(err).__name__}: {err}")
                continue
            if (
                d.stats.get("feasible")
                and math.isfinite(d.objective)
                and (best is None or d.objective < best.objective)
            ):
                best, source = d, name
        if best is None:
            why = "; ".join(errors) or "no feasible decision"
            raise LabellingError(
                f"instance {instance_id}: {self.cfg.primary} ({status}) and every fallback failed: {why}"
            )
        return self._make(instance_id, prompt, best, source, lower_bound, status, start, attempt)

    @staticmethod
    def _make(
        instance_id: int,
        prompt: str,
        d: Decision,
        source: str,
        lower_bound: float | None,
        status: str,
        start: float,
        attempt: int,
    ) -> Label:
        gap = d.stats.get("gap") if source == "exact" else certified_gap(d.objective, lower_bound)
        return Label(
            instance_id=instance_id,
            prompt=prompt,
            target=d.target.copy(),
            share=d.share.copy(),
            objective=float(d.objective),
            source=source,
            gap=None if gap is None else float(gap),
            lower_bound=None if lower_bound is None else float(lower_bound),
            exact_status=status,
            wall_s=time.perf_counter() - start,
            worker_pid=os.getpid(),
            attempt=attempt,
        )
