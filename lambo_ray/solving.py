"""Deciding instances with a named method: the method registry and the solve loops.

Every caller that turns instances into decisions by method name goes through here: ``lambo solve``
(streaming, resumable), the reproduction report and the benchmarks (:func:`solve_all`). A method is
either a registered expert (:mod:`lambo_ray.experts`) or the LAMBO policy loaded from a checkpoint.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance, check_prompt

# Instances per policy call: large enough to batch the decoder, small enough that a crash loses
# little; a resumed `lambo solve` restarts at a multiple of it so the batches match an uninterrupted run.
LAMBO_BATCH = 64


@dataclass(frozen=True)
class Method:
    """What the command line and the resume logic need to know about a method."""

    name: str
    help: str
    seeded: bool = False  # uses --seed
    online: bool = False  # learns while it decides: a decision depends on the instances before it


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("exact", "Pyomo + HiGHS with a certified optimality gap (the reference)"),
        Method("de", "differential evolution over the targets, water-filled shares", seeded=True),
        Method("droo", "DROO: online deep RL with a replay memory (warms up first)", seeded=True, online=True),
        Method("are", "ARE: online per-UE network refined by simulated annealing", seeded=True, online=True),
        Method("greedy", "one constructive pass, each UE where the objective change is best"),
        Method("local_search", "greedy, then single-UE moves and swaps while they improve"),
        Method("all_local", "every task on its UE"),
        Method("all_offload", "every task offloaded (seeded random server), equal shares", seeded=True),
        Method("brute_force", "every (M+1)^N assignment (tiny instances only)"),
        Method("lambo", "the LAMBO policy from --checkpoint (default: the shipped LAMBO-S) and --decoder", seeded=True),
    )
}


@dataclass(frozen=True)
class SolveOptions:
    """Everything that determines a run's decisions besides the instances (recorded for --resume)."""

    method: str
    prompt: str
    time_limit: float | None = None
    seed: int = 0
    checkpoint: str | None = None
    decoder: str | None = None
    decode: str = "greedy"
    k: int = 16
    time_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LamboInputError(
                f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}", where="method"
            )
        check_prompt(self.prompt)
        if self.time_limit is not None and not self.time_limit > 0:
            raise LamboInputError(f"--time-limit must be > 0 (got {self.time_limit})")
        if self.time_budget_ms is not None:
            if self.method != "lambo":
                raise LamboInputError("--time-budget-ms applies to --method lambo (use --time-limit)")
            if not self.time_budget_ms > 0:
                raise LamboInputError(f"--time-budget-ms must be > 0 (got {self.time_budget_ms})")
        if self.method == "lambo" and self.checkpoint is None:
            from lambo_ray.policy.checkpoint import default_checkpoint

            object.__setattr__(self, "checkpoint", str(default_checkpoint()))  # the shipped LAMBO-S (frozen)

    @property
    def batch(self) -> int:
        """Instances decided per call (the policy batches; experts decide one at a time)."""
        return LAMBO_BATCH if self.method == "lambo" else 1

    def record(self) -> dict[str, Any]:
        """The options as plain JSON values; paths resolved so a move of the working directory is seen."""
        out = {**asdict(self), "batch": self.batch}
        for key in ("checkpoint", "decoder"):
            if out[key] is not None:
                out[key] = str(Path(out[key]).expanduser().resolve())
        return out


Solver = Callable[[list[Instance]], list[Decision]]


def make_solver(opts: SolveOptions) -> Solver:
    """A function deciding a list of instances with the options' method (model loaded once)."""
    if opts.method == "lambo":
        return _lambo_solver(opts)
    from lambo_ray.experts import get_expert

    kwargs: dict[str, Any] = {"seed": opts.seed} if METHODS[opts.method].seeded else {}
    if opts.method in ("droo", "are") and opts.checkpoint is not None:
        kwargs["checkpoint"] = opts.checkpoint  # a saved online expert (`save(path)`) instead of a fresh warm-up
    expert = get_expert(opts.method, **kwargs)
    return lambda instances: [expert.solve(inst, opts.prompt, opts.time_limit) for inst in instances]


def _lambo_solver(opts: SolveOptions) -> Solver:
    from lambo_ray.policy.checkpoint import load_decoder, load_policy, resolve_policy_dir
    from lambo_ray.policy.decoding import decide

    policy, _ = load_policy(resolve_policy_dir(opts.checkpoint))
    if opts.decoder is not None:
        load_decoder(policy, opts.decoder)
    extra: dict[str, Any] = {}
    if opts.time_budget_ms is not None:
        if "time_budget_s" not in inspect.signature(decide).parameters:
            raise LamboInputError("--time-budget-ms: this installation's policy decoding takes no time budget")
        extra["time_budget_s"] = opts.time_budget_ms / 1e3
    return lambda instances: decide(policy, instances, opts.prompt, mode=opts.decode, k=opts.k, seed=opts.seed, **extra)


def batched(items: Iterable[Instance], size: int) -> Iterator[list[Instance]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def solve_stream(solver: Solver, instances: Iterable[Instance], batch: int) -> Iterator[Decision]:
    """Decisions in input order, produced as the instances arrive (``batch`` at a time)."""
    for chunk in batched(instances, batch):
        yield from solver(chunk)


def solve_all(
    method: str,
    instances: Sequence[Instance],
    prompt: str,
    *,
    progress: bool = False,
    **options: Any,
) -> list[Decision]:
    """Decisions of one method for a list of instances (what the report and the benchmarks call).

    ``options`` are :class:`SolveOptions` fields (``time_limit``, ``seed``, ``checkpoint``, ``decoder``,
    ``decode``, ``k``, ``time_budget_ms``).
    """
    for key in ("checkpoint", "decoder"):
        if options.get(key) is not None:
            options[key] = str(options[key])
    opts = SolveOptions(method=method, prompt=prompt, **options)
    stream: Iterable[Decision] = solve_stream(make_solver(opts), instances, opts.batch)
    if progress:
        from rich.progress import track

        stream = track(stream, total=len(instances), description=f"{method} {prompt}", transient=True)
    return list(stream)
