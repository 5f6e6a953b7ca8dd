"""The labelling side of ALEF: a pool of Ray actors that run the expert on queried instances.

Each actor (``num_cpus=1``) holds one :class:`~lambo_ray.alef.worker.LabelWorker` and labels one
instance at a time under a per-instance time limit. HiGHS stops only when it next checks its own
limit, and a running actor task cannot be cancelled, so the pool enforces a deadline of its own:
the time limit times the number of experts a label may run (exact, then each fallback), plus
``grace_s``. An actor that misses it is killed (``ray.kill``) and replaced and its instance retried,
at most ``max_attempts`` times in all; then the instance is reported as :class:`Skipped` and the
run goes on. A deadline counts from when a *started* actor got the task: a replacement's start-up
(importing the solvers takes seconds) has its own, longer limit (``start_timeout_s``).

Scheduling is explicit rather than ``ray.util.ActorPool`` because ActorPool can neither recover
from an actor that dies mid-task nor time one out: here every in-flight task is tracked as (actor
slot, instance position, deadline), ``ray.wait`` always runs with a timeout so deadlines are checked
however long a solve hangs, and results are stored by position, so every instance is labelled (or
skipped) exactly once, however many actors die on the way. Only a pool-wide failure (actors that
keep failing to start) raises; one failed label never does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lambo_ray.alef.labels import Label, LabellingError, Outcome, Skipped
from lambo_ray.alef.worker import LabelWorker, LabelWorkerConfig
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Instance, check_prompt

__all__ = ["ExpertPool", "Label", "LabellingError", "LabelWorker", "LabelWorkerConfig", "PoolStats", "Skipped"]

POLL_S = 1.0  # longest single ray.wait: deadlines and start-ups are checked at least this often


@dataclass
class PoolStats:
    labelled: int = 0
    actors_replaced: int = 0
    retries: int = 0  # instances sent again after their actor died or missed its deadline
    timeouts: int = 0  # tasks whose actor missed its deadline (killed)
    start_failures: int = 0  # actors that died or timed out while starting
    skipped: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    skips: list[dict[str, Any]] = field(default_factory=list)  # Skipped.to_dict() of each


@dataclass
class _Slot:
    actor: Any
    start_ref: Any  # ObjectRef of actor.pid(): resolves once the actor has started
    start_deadline: float
    ready: bool = False


@dataclass
class _Task:
    slot: int
    pos: int
    deadline: float  # time.monotonic() after which the actor is killed


@dataclass
class _Job:
    """One label_iter call: which instances are queued, in flight, done."""

    ids: list[int]
    prompts: list[str]
    refs: list[Any]  # ray.put of each instance: stored once, re-sent cheaply on a retry
    queue: deque[int]
    attempts: list[int]
    in_flight: dict[Any, _Task] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class ExpertPool:
    """``n_actors`` Ray actors labelling instances in parallel, surviving actor deaths and hangs.

    ``label(instances, prompt)`` returns one :class:`Label` or :class:`Skipped` per instance in input
    order; ``label_iter`` yields them as they complete (so a caller can save each one at once).
    """

    def __init__(
        self,
        n_actors: int = 2,
        time_limit: float | None = 10.0,
        worker: LabelWorkerConfig | None = None,
        max_attempts: int = 3,
        cpus_per_actor: float = 1.0,
        grace_s: float = 10.0,
        start_timeout_s: float = 300.0,
    ) -> None:
        """``cpus_per_actor`` stays 1 in production (HiGHS runs single-threaded, one instance per
        actor); tests sharing a 2-CPU Ray with other actors may pass a fraction. ``time_limit=None``
        leaves each expert its own limit and the pool no deadline."""
        import ray

        if n_actors < 1:
            raise LamboInputError(f"experts must be >= 1 (got {n_actors})", where="experts")
        if time_limit is not None and not time_limit > 0:
            raise LamboInputError(f"time limit must be > 0 s (got {time_limit})", where="time_limit")
        if max_attempts < 1 or grace_s < 0 or not start_timeout_s > 0:
            raise LamboInputError("max_attempts must be >= 1, grace_s >= 0, start_timeout_s > 0", where="experts")
        if not ray.is_initialized():
            raise RuntimeError("ExpertPool needs a running Ray (lambo_ray.commands.common.init_ray)")
        need = n_actors * cpus_per_actor
        free = _free_cpus(need, wait_s=min(start_timeout_s, 30.0))
        if need > free:
            # Each actor reserves its CPUs: more than are free would wait to be placed, maybe forever.
            total = ray.cluster_resources().get("CPU", 0.0)
            raise LamboInputError(
                f"{n_actors} expert actors need {need:g} CPUs; {free:g} of the cluster's {total:g} are free",
                where="experts",
            )
        self.n_actors = n_actors
        self.time_limit = time_limit
        self.worker_cfg = worker or LabelWorkerConfig()
        self.max_attempts = max_attempts
        self.start_timeout_s = start_timeout_s
        self.deadline_s = None if time_limit is None else time_limit * self.worker_cfg.experts_per_label + grace_s
        self.stats = PoolStats()
        self._remote_cls = ray.remote(num_cpus=cpus_per_actor, max_restarts=0, max_task_retries=0)(LabelWorker)
        self._slots = [self._start_actor() for _ in range(n_actors)]
        self._idle: list[int] = []  # started actors with nothing to do
        self._failing = 0  # consecutive start failures

    # -- actors ---------------------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        return [s.actor for s in self._slots]

    def _start_actor(self) -> _Slot:
        actor = self._remote_cls.remote(self.worker_cfg)
        return _Slot(actor, actor.pid.remote(), time.monotonic() + self.start_timeout_s)

    def _replace(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone: nothing to clean up
            ray.kill(self._slots[slot].actor, no_restart=True)
        if slot in self._idle:
            self._idle.remove(slot)
        self._slots[slot] = self._start_actor()
        self.stats.actors_replaced += 1

    def _starting(self) -> dict[Any, int]:
        return {s.start_ref: k for k, s in enumerate(self._slots) if not s.ready}

    def _started(self, slot: int) -> None:
        """An actor's start-up call returned (or failed): it joins the idle ones or is replaced."""
        import ray

        try:
            ray.get(self._slots[slot].start_ref)
        except Exception as err:
            self._start_failed(slot, f"{type(err).__name__}: {err}")
            return
        self._slots[slot].ready = True
        self._idle.append(slot)
        self._failing = 0

    def _start_failed(self, slot: int, why: str) -> None:
        self.stats.start_failures += 1
        self._failing += 1
        if self._failing >= max(3, self.n_actors + 1):  # not one bad actor: the pool cannot start any
            raise LabellingError(f"expert actors keep failing to start ({self._failing} in a row): {why}")
        self._replace(slot)

    def _expire_starts(self) -> None:
        now = time.monotonic()
        for slot in [k for k in self._starting().values() if now > self._slots[k].start_deadline]:
            self._start_failed(slot, f"not started within {self.start_timeout_s:g} s")

    def warm_up(self) -> list[int]:
        """Wait until every actor has started (imports done); returns their process ids."""
        import ray

        while self._starting():
            refs = list(self._starting())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            for ref in ready:
                self._started(self._starting()[ref])
            self._expire_starts()
        return ray.get([a.pid.remote() for a in self.actors], timeout=self.start_timeout_s)

    # -- labelling ------------------------------------------------------------------------------
    def label(
        self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int] | None = None
    ) -> list[Outcome]:
        by_id = {o.instance_id: o for o in self.label_iter(instances, prompt, ids)}
        ids = list(range(len(instances))) if ids is None else list(ids)
        return [by_id[i] for i in ids]

    def label_iter(
        self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int] | None = None
    ) -> Iterator[Outcome]:
        """Outcomes as they complete (any order); ``prompt`` is one for all or one per instance."""
        job = self._new_job(instances, prompt, ids)
        try:
            while job.queue or job.in_flight:
                self._dispatch(job)
                for outcome in self._step(job):
                    self._dispatch(job)  # actors keep working while the caller handles an outcome
                    yield outcome
        finally:  # abandoned mid-run (the caller stopped or raised): free the busy actors
            for task in job.in_flight.values():
                self._replace(task.slot)
            job.in_flight.clear()

    def _new_job(self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int] | None) -> _Job:
        import ray

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
        refs = [ray.put(inst) for inst in instances]
        return _Job(ids, prompts, refs, deque(range(len(instances))), [0] * len(instances))

    def _dispatch(self, job: _Job) -> None:
        while job.queue and self._idle:
            slot, pos = self._idle.pop(), job.queue.popleft()
            job.attempts[pos] += 1
            actor = self._slots[slot].actor
            ref = actor.label.remote(job.ids[pos], job.refs[pos], job.prompts[pos], self.time_limit, job.attempts[pos])
            deadline = math.inf if self.deadline_s is None else time.monotonic() + self.deadline_s
            job.in_flight[ref] = _Task(slot, pos, deadline)

    def _wait_s(self, job: _Job) -> float:
        deadlines = [t.deadline for t in job.in_flight.values()]
        deadlines += [self._slots[k].start_deadline for k in self._starting().values()]
        return min(POLL_S, max(0.0, min(deadlines, default=math.inf) - time.monotonic()))

    def _step(self, job: _Job) -> list[Outcome]:
        """Wait (bounded) for one task or actor start-up; then handle missed deadlines."""
        import ray

        starting = self._starting()
        refs = list(job.in_flight) + list(starting)
        if not refs:  # every actor idle yet work queued: dispatch would have used them
            raise AssertionError("expert pool stalled: queued instances but no busy, starting or idle actor")
        ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait_s(job))
        out: list[Outcome] = []
        for ref in ready:
            if ref in job.in_flight:
                out += self._finish(job, ref)
            else:
                self._started(starting[ref])
        out += self._expire(job)
        self._expire_starts()
        return out

    def _finish(self, job: _Job, ref: Any) -> list[Outcome]:
        import ray
        from ray.exceptions import RayTaskError

        task = job.in_flight.pop(ref)
        try:
            lab: Label = ray.get(ref)
        except RayTaskError as err:  # the worker raised: both experts failed; retrying cannot help
            self._idle.append(task.slot)
            return [self._skip(job, task.pos, str(err.cause if err.cause else err).splitlines()[0])]
        except Exception as err:  # the actor died (or its result was lost): a fresh one retries
            self._replace(task.slot)
            return self._retry_or_skip(job, task.pos, f"its actor died ({type(err).__name__})")
        self._idle.append(task.slot)
        if task.pos in job.done or lab.instance_id != job.ids[task.pos]:  # guards the exactly-once invariant
            raise AssertionError(f"label for instance {job.ids[task.pos]} delivered twice or misrouted")
        job.done.add(task.pos)
        self.stats.labelled += 1
        self.stats.by_source[lab.source] = self.stats.by_source.get(lab.source, 0) + 1
        return [lab]

    def _expire(self, job: _Job) -> list[Outcome]:
        now, out = time.monotonic(), []
        for ref in [r for r, t in job.in_flight.items() if now > t.deadline]:
            task = job.in_flight.pop(ref)
            self.stats.timeouts += 1
            self._replace(task.slot)  # a running solve cannot be cancelled: its actor goes
            out += self._retry_or_skip(job, task.pos, f"no label within its {self.deadline_s:g} s deadline")
        return out

    def _retry_or_skip(self, job: _Job, pos: int, why: str) -> list[Outcome]:
        if job.attempts[pos] >= self.max_attempts:
            return [self._skip(job, pos, f"{why}; gave up after {job.attempts[pos]} attempts")]
        self.stats.retries += 1
        job.queue.appendleft(pos)
        return []

    def _skip(self, job: _Job, pos: int, reason: str) -> Skipped:
        s = Skipped(job.ids[pos], job.prompts[pos], reason, job.attempts[pos])
        job.done.add(pos)
        self.stats.skipped += 1
        self.stats.skips.append(s.to_dict())
        return s

    def shutdown(self) -> None:
        import ray

        for s in self._slots:
            with contextlib.suppress(Exception):
                ray.kill(s.actor, no_restart=True)
        self._slots, self._idle = [], []

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _free_cpus(need: float, wait_s: float) -> float:
    """Free CPUs of the cluster, waiting up to ``wait_s`` for ``need`` of them: actors of a job that just
    ended (a pretraining run's env runners, say) release theirs a moment after they are stopped."""
    import time

    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= need or time.monotonic() >= deadline:
            return free
        time.sleep(0.5)
