"""The one interface every method implements: ``solve(instance, prompt, time_limit) -> Decision``.

A Decision carries the solver statistics in ``decision.stats`` with these keys (all methods):
``wall_s`` (float), ``status`` (str: "optimal", "feasible", "time_limit", "infeasible", "heuristic"),
and, where the method knows them, ``lower_bound``, ``gap`` (relative, certified) and
``proven_optimal`` (bool). ``decision.objective`` is always the evaluator's value, never a
solver-internal one, so every method is scored the same way.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import Decision, Instance, check_prompt


class Expert(ABC):
    """A method that decides an instance for a prompt. Subclasses implement :meth:`_solve`."""

    name: str = "expert"

    def solve(self, inst: Instance, prompt: str, time_limit: float | None = None) -> Decision:
        check_prompt(prompt)
        start = time.perf_counter()
        target, share, stats = self._solve(inst, prompt, time_limit)
        stats = {"status": "heuristic", **stats, "wall_s": time.perf_counter() - start}
        return make_decision(inst, target, share, prompt, self.name, stats)

    @abstractmethod
    def _solve(
        self, inst: Instance, prompt: str, time_limit: float | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Return (target, share, stats)."""


def make_decision(
    inst: Instance, target: np.ndarray, share: np.ndarray, prompt: str, method: str, stats: dict[str, Any]
) -> Decision:
    """Wrap a decision with the evaluator's objective and feasibility (the only source of both)."""
    ev = evaluate(inst, target, share)
    stats = {**stats, "feasible": ev.feasible}
    return Decision(
        target=target, share=share, prompt=prompt, method=method, objective=ev.objective(prompt), stats=stats
    )


_REGISTRY: dict[str, Callable[..., Expert]] = {}


def register(name: str) -> Callable[[Callable[..., Expert]], Callable[..., Expert]]:
    def deco(factory: Callable[..., Expert]) -> Callable[..., Expert]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_expert(name: str, **kwargs: Any) -> Expert:
    """Build a registered method by name (``exact``, ``de``, ``droo``, ``are``, ``greedy``, ...)."""
    import lambo_ray.experts  # noqa: F401  (imports every module, which registers itself)

    if name not in _REGISTRY:
        raise LamboInputError(
            f"unknown method {name!r}; expected one of {', '.join(sorted(_REGISTRY))}", where="method"
        )
    return _REGISTRY[name](**kwargs)


def available_methods() -> list[str]:
    import lambo_ray.experts  # noqa: F401

    return sorted(_REGISTRY)
