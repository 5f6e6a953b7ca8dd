"""The labelling side of ALEF: a pool of Ray actors that run the expert on queried instances.

Each actor (``num_cpus=1``) holds one exact expert (Pyomo + HiGHS) and labels one instance at a
time under a per-instance time limit. When exact stops without a proof (time limit, gap not closed)
or fails outright, the actor falls back to DE and keeps the better feasible decision, and the
label says which expert produced it (``source``: ``"exact"``, ``"exact_time_limit"`` or ``"de"``)
and how far from optimal it is known to be (``gap``, certified against exact's lower bound when
there is one). Fine-tuning on a label whose quality is unknown would be imitation of noise, so this
provenance travels with every label into the buffer and the metrics.

Scheduling is explicit rather than ``ray.util.ActorPool`` because ActorPool cannot recover from an
actor that dies mid-task: here every in-flight task is tracked as (actor slot, instance position),
a dead actor is replaced by a fresh one and its instance goes back to the front of the queue, and
results are stored by position, so every instance is labelled exactly once and returned in input
order, however many actors die on the way.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance, check_prompt

LabelSource = Literal["exact", "exact_time_limit", "de"]


@dataclass
class Label:
    """One expert decision for one queried instance, with its provenance."""

    instance_id: int
    prompt: str
    target: np.ndarray
    share: np.ndarray
    objective: float
    source: LabelSource
    gap: float | None  # certified relative gap (objective - lower_bound) / |objective|; None when unknown
    lower_bound: float | None
    exact_status: str  # what the exact expert reported ("optimal", "time_limit", "error: ...", ...)
    wall_s: float  # expert time for this instance, both experts included
    worker_pid: int
    attempt: int = 1  # 2 or more: the first actor(s) died with this instance in flight

    def decision(self) -> Decision:
        return Decision(
            target=self.target,
            share=self.share,
            prompt=self.prompt,
            method=self.source,
            objective=self.objective,
            stats={"gap": self.gap, "source": self.source},
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"], d["share"] = self.target.tolist(), self.share.tolist()
        return d


class LabellingError(RuntimeError):
    """An instance could not be labelled (both experts failed, or its actors kept dying)."""


def _certified_gap(objective: float, lower_bound: float | None) -> float | None:
    if lower_bound is None or not math.isfinite(lower_bound) or objective == 0:
        return None
    return max(0.0, objective - lower_bound) / abs(objective)


@dataclass
class LabelWorkerConfig:
    """What one actor runs. Expert names go through the registry, so tests may swap in cheap ones."""

    primary: str = "exact"
    fallback: str = "de"
    primary_kwargs: dict[str, Any] = field(default_factory=dict)
    # A label is worth the best DE can do: start its population from all-local and greedy.
    fallback_kwargs: dict[str, Any] = field(default_factory=lambda: {"init": "seeded"})


class LabelWorker:
    """Plain class (wrapped as a Ray actor by :class:`ExpertPool`), so it is testable without Ray."""

    def __init__(self, cfg: LabelWorkerConfig) -> None:
        from lambo_ray.experts import get_expert

        self.cfg = cfg
        self._get_expert = get_expert
        self.primary = get_expert(cfg.primary, **cfg.primary_kwargs)
        self._fallback = None  # built on first use: most labels never need it

    def pid(self) -> int:
        return os.getpid()

    def fallback(self):
        if self._fallback is None:
            self._fallback = self._get_expert(self.cfg.fallback, **self.cfg.fallback_kwargs)
        return self._fallback

    def label(self, instance_id: int, inst: Instance, prompt: str, time_limit: float | None, attempt: int = 1) -> Label:
        start = time.perf_counter()
        exact: Decision | None = None
        try:
            exact = self.primary.solve(inst, prompt, time_limit)
            status = str(exact.stats.get("status"))
        except Exception as err:  # a solver crash must not lose the label: DE still can produce one
            status = f"error: {type(err).__name__}: {err}"
        lower_bound = None if exact is None else exact.stats.get("lower_bound")
        usable = exact is not None and bool(exact.stats.get("feasible")) and math.isfinite(exact.objective)
        if usable and exact.stats.get("proven_optimal"):
            return self._make(instance_id, prompt, exact, "exact", lower_bound, status, start, attempt)

        best, source = (exact, "exact_time_limit") if usable else (None, "de")
        try:
            de = self.fallback().solve(inst, prompt, time_limit)
        except Exception as err:
            if best is None:
                raise LabellingError(
                    f"instance {instance_id}: exact ({status}) and "
                    f"{self.cfg.fallback} ({type(err).__name__}: {err}) both failed"
                ) from err
            de = None
        if de is not None and de.stats.get("feasible") and (best is None or de.objective < best.objective):
            best, source = de, "de"
        if best is None:
            raise LabellingError(
                f"instance {instance_id}: neither exact ({status}) nor {self.cfg.fallback} found a feasible decision"
            )
        return self._make(instance_id, prompt, best, source, lower_bound, status, start, attempt)

    @staticmethod
    def _make(
        instance_id: int,
        prompt: str,
        d: Decision,
        source: LabelSource,
        lower_bound: float | None,
        status: str,
        start: float,
        attempt: int,
    ) -> Label:
        gap = d.stats.get("gap") if source == "exact" else _certified_gap(d.objective, lower_bound)
        return Label(
            instance_id=instance_id,
            prompt=prompt,
            target=d.target.copy(),
            share=d.share.copy(),
            objective=float(d.objective),
            source=source,
            gap=None if gap is None else float(gap),
            lower_bound=lower_bound,
            exact_status=status,
            wall_s=time.perf_counter() - start,
            worker_pid=os.getpid(),
            attempt=attempt,
        )


@dataclass
class PoolStats:
    labelled: int = 0
    actors_replaced: int = 0
    retries: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


class ExpertPool:
    """``n_actors`` Ray actors labelling instances in parallel, surviving actor deaths.

    ``label(instances, prompt)`` returns one :class:`Label` per instance in input order;
    ``label_iter`` yields them as they complete (so a caller can keep deciding online meanwhile).
    """

    def __init__(
        self,
        n_actors: int = 2,
        time_limit: float | None = 10.0,
        worker: LabelWorkerConfig | None = None,
        max_attempts: int = 3,
        cpus_per_actor: float = 1.0,
    ) -> None:
        """``cpus_per_actor`` stays 1 in production (HiGHS runs single-threaded, one instance per
        actor); tests sharing a 2-CPU Ray with other actors may pass a fraction."""
        import ray

        if n_actors < 1:
            raise LamboInputError(f"experts must be >= 1 (got {n_actors})", where="experts")
        if time_limit is not None and not time_limit > 0:
            raise LamboInputError(f"time limit must be > 0 s (got {time_limit})", where="time_limit")
        if not ray.is_initialized():
            raise RuntimeError("ExpertPool needs a running Ray (lambo_ray.commands.common.init_ray)")
        cpus = ray.cluster_resources().get("CPU", 0)
        if n_actors * cpus_per_actor > cpus:
            # Each actor reserves its CPU: more than the cluster has would wait forever to be placed.
            raise LamboInputError(
                f"{n_actors} expert actors need {n_actors * cpus_per_actor:g} CPUs, the cluster has {cpus:g}",
                where="experts",
            )
        self.n_actors = n_actors
        self.time_limit = time_limit
        self.worker_cfg = worker or LabelWorkerConfig()
        self.max_attempts = max_attempts
        self.stats = PoolStats()
        self._remote_cls = ray.remote(num_cpus=cpus_per_actor, max_restarts=0, max_task_retries=0)(LabelWorker)
        self.actors = [self._new_actor() for _ in range(n_actors)]

    def _new_actor(self):
        return self._remote_cls.remote(self.worker_cfg)

    def warm_up(self) -> list[int]:
        """Wait until every actor has started (imports done); returns their process ids."""
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def label(
        self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int] | None = None
    ) -> list[Label]:
        by_id = {lab.instance_id: lab for lab in self.label_iter(instances, prompt, ids)}
        ids = list(range(len(instances))) if ids is None else list(ids)
        return [by_id[i] for i in ids]

    def label_iter(
        self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int] | None = None
    ) -> Iterator[Label]:
        """Labels as they complete (any order); ``prompt`` is one for all or one per instance."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        prompts = [prompt] * len(instances) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(instances):
            raise LamboInputError(f"{len(prompts)} prompts for {len(instances)} instances", where="prompt")
        for p in set(prompts):
            check_prompt(p)
        ids = list(range(len(instances))) if ids is None else [int(i) for i in ids]
        if len(ids) != len(instances):
            raise LamboInputError(f"{len(ids)} ids for {len(instances)} instances", where="ids")
        if len(set(ids)) != len(ids):
            raise LamboInputError("instance ids must be unique (labels are tracked by id)", where="ids")
        refs = [ray.put(inst) for inst in instances]  # stored once, re-sent cheaply on a retry
        queue: deque[int] = deque(range(len(instances)))
        attempts = [0] * len(instances)
        idle = list(range(self.n_actors))
        in_flight: dict[Any, tuple[int, int]] = {}  # ObjectRef -> (actor slot, position)
        done: set[int] = set()

        def dispatch() -> None:
            # Every idle actor gets the next instance; called before each yield too, so actors keep
            # working while the caller handles a label.
            while queue and idle:
                slot, pos = idle.pop(), queue.popleft()
                attempts[pos] += 1
                ref = self.actors[slot].label.remote(ids[pos], refs[pos], prompts[pos], self.time_limit, attempts[pos])
                in_flight[ref] = (slot, pos)

        while queue or in_flight:
            dispatch()
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, pos = in_flight.pop(ready[0])
            try:
                lab: Label = ray.get(ready[0])
            except RayActorError as err:
                self._replace(slot)
                idle.append(slot)
                if attempts[pos] >= self.max_attempts:
                    self._cancel(in_flight)
                    raise LabellingError(f"instance {ids[pos]}: {attempts[pos]} actors died labelling it") from err
                self.stats.retries += 1
                queue.appendleft(pos)
                continue
            except RayTaskError as err:
                self._cancel(in_flight)
                raise LabellingError(f"instance {ids[pos]}: {err.cause if err.cause else err}") from err
            idle.append(slot)
            if pos in done or lab.instance_id != ids[pos]:  # guards the exactly-once invariant
                raise AssertionError(f"label for instance {ids[pos]} delivered twice or misrouted")
            done.add(pos)
            self.stats.labelled += 1
            self.stats.by_source[lab.source] = self.stats.by_source.get(lab.source, 0) + 1
            dispatch()
            yield lab

    def _replace(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone: nothing to clean up
            ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.stats.actors_replaced += 1

    @staticmethod
    def _cancel(in_flight: dict[Any, tuple[int, int]]) -> None:
        import ray

        for ref in in_flight:
            ray.cancel(ref, force=False)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
