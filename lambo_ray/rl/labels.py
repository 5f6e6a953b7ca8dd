"""Expert labels for imitation, over a scenario distribution, cached on disk and made in parallel.

Training instance ``index`` of a label set is a pure function of (distribution, seed, index): its
scenario and its instance are drawn from ``SeedSequence([seed, index])``, so only the labels are stored,
never the instances. Each instance is labelled for every prompt by the best affordable expert:

* ``min_energy``: iterated local search from the greedy heuristic (moves, swaps, ejection chains,
  perturbations: milliseconds) and the exact MILP with a time limit (optimal in ~0.1 s at N = 50, the
  incumbent with its certified gap where the limit stops it at N = 100-200); the better one is kept;
* ``min_latency``: the exact outer approximation costs seconds to minutes, so iterated local search
  labels every cell (within ~0.02% of the exact optimum where we could check), and the exact expert
  only cells with at most ``latency_exact_max_ues`` UEs.

The cache is a JSONL file: a header line with the key (distribution, seed, expert settings) and one
line per label, appended and fsync'ed as it arrives, so an interrupted run resumes without redoing a
label, and a cache made for another key is refused with a message saying so. Labels are computed by
Ray tasks (one CPU each) when Ray is running, with a deadline per task: a task that misses it is
cancelled and its instances are retried one by one, then skipped and reported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.distribution import ScenarioDistribution
from lambo_ray.mec.generator import generate
from lambo_ray.mec.instance import PROMPTS, Instance

LABELS_FORMAT = "lambo.labels/1"


@dataclass(frozen=True)
class LabelConfig:
    energy_exact_time_limit: float = 3.0  # s per min_energy exact solve (0: no exact solve)
    energy_exact_max_ues: int = 80  # larger cells: iterated local search only (the MILP needs > 3 s there)
    latency_exact_max_ues: int = 0  # exact min_latency labels only for cells this small (0: never)
    latency_exact_time_limit: float = 10.0
    kicks: int = 20  # perturbation rounds of the iterated local search (min_energy)
    latency_kicks: int = 4  # min_latency: local search alone is within ~0.02% of optimal
    chunk: int = 4  # instances per Ray task
    task_grace_s: float = 60.0  # a task's deadline: its instances' time limits x 2 + this


@dataclass
class Label:
    index: int
    prompt: str
    target: list[int]
    objective: float
    source: str  # "ils", "exact", "exact_time_limit"
    gap: float | None  # certified relative gap when the exact expert produced it
    wall_s: float


def training_instance(dist: ScenarioDistribution, seed: int, index: int) -> Instance:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return generate(dist.sample(rng), rng)


def label_instance(inst: Instance, prompt: str, cfg: LabelConfig, seed: int = 0) -> tuple[np.ndarray, float, str, Any]:
    """(target, objective, source, certified gap) of the best affordable expert (module docstring)."""
    from lambo_ray.experts import get_expert
    from lambo_ray.experts.heuristics import greedy_assignment
    from lambo_ray.experts.ils import iterated_local_search
    from lambo_ray.experts.placement import build_tables

    tables = build_tables(inst, prompt)
    start = greedy_assignment(tables)[0].target
    kicks = cfg.kicks if prompt == "min_energy" else cfg.latency_kicks
    res = iterated_local_search(tables, [("heuristic", start)], np.random.default_rng(seed), kicks)
    best = (res.target, tables.scale * res.cost, "ils", None) if res is not None else None
    limit = cfg.energy_exact_time_limit if prompt == "min_energy" else cfg.latency_exact_time_limit
    max_ues = cfg.energy_exact_max_ues if prompt == "min_energy" else cfg.latency_exact_max_ues
    use_exact = limit > 0 and inst.n_ues <= max_ues
    if use_exact:
        d = get_expert("exact").solve(inst, prompt, limit)
        # Ties go to the exact expert: its label carries a certificate (status, gap).
        if d.stats["feasible"] and (best is None or d.objective <= best[1] * (1 + 1e-12)):
            source = "exact" if d.stats.get("proven_optimal") else "exact_time_limit"
            best = (d.target, float(d.objective), source, d.stats.get("gap"))
    if best is None:
        raise LamboInputError("no feasible decision found for a training instance", where="labels")
    return best


def label_chunk(
    dist: ScenarioDistribution, seed: int, items: Sequence[tuple[int, str]], cfg: LabelConfig
) -> list[Label]:
    """Labels of ``items`` (index, prompt); runs in a Ray task or inline."""
    out = []
    for index, prompt in items:
        inst = training_instance(dist, seed, index)
        start = time.perf_counter()
        target, obj, source, gap = label_instance(inst, prompt, cfg, seed=index)
        out.append(Label(index, prompt, [int(t) for t in target], obj, source, gap, time.perf_counter() - start))
    return out


class LabelCache:
    """Append-only JSONL store of labels under one key (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))
        self.labels: dict[tuple[int, str], Label] = {}
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"format": LABELS_FORMAT, "key": self.key})

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != LABELS_FORMAT:
            raise LamboInputError(f"not a {LABELS_FORMAT} label cache", where=str(self.path))
        if header.get("key") != self.key:
            raise LamboInputError(
                "label cache was made for other settings (distribution, seed or experts); "
                "delete it or choose another path",
                where=str(self.path),
            )
        for line in lines[1:]:
            try:
                lab = Label(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn last line of an interrupted run: that label is redone
            self.labels[(lab.index, lab.prompt)] = lab
        self._rewrite_if_torn(len(lines) - 1)

    def _rewrite_if_torn(self, lines: int) -> None:
        if lines != len(self.labels):
            from lambo_ray.mec.io import atomic_write_text

            docs = [{"format": LABELS_FORMAT, "key": self.key}, *(asdict(v) for v in self.labels.values())]
            atomic_write_text(self.path, "".join(json.dumps(d) + "\n" for d in docs))

    def _append(self, doc: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(doc) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, labels: Sequence[Label]) -> None:
        for lab in labels:
            self.labels[(lab.index, lab.prompt)] = lab
            self._append(asdict(lab))


def build_labels(
    dist: ScenarioDistribution,
    seed: int,
    count: int,
    cache_path: str | os.PathLike[str],
    cfg: LabelConfig | None = None,
    prompts: Sequence[str] = PROMPTS,
    log: Callable[[str], None] = print,
) -> list[Label]:
    """Labels of instances 0..count-1 for every prompt, from the cache where present; the rest are
    computed (in parallel Ray tasks when Ray is initialised) and appended to the cache."""
    cfg = cfg or LabelConfig()
    experts = {k: v for k, v in asdict(cfg).items() if k not in ("chunk", "task_grace_s")}  # what changes labels
    key = {"distribution": dist.to_dict(), "seed": seed, "experts": experts, "prompts": list(prompts)}
    cache = LabelCache(cache_path, key)
    todo = [(i, p) for i in range(count) for p in prompts if (i, p) not in cache.labels]
    if todo:
        log(f"labels: {len(cache.labels)} cached, {len(todo)} to compute")
        _compute(dist, seed, todo, cfg, cache, log)
    missing = [(i, p) for i in range(count) for p in prompts if (i, p) not in cache.labels]
    if missing:
        log(f"labels: {len(missing)} skipped (no label in time), e.g. instance {missing[0][0]} {missing[0][1]}")
    return [cache.labels[(i, p)] for i in range(count) for p in prompts if (i, p) in cache.labels]


def _compute(
    dist: ScenarioDistribution,
    seed: int,
    todo: list[tuple[int, str]],
    cfg: LabelConfig,
    cache: LabelCache,
    log: Callable[[str], None],
) -> None:
    import ray

    chunks = [todo[k : k + cfg.chunk] for k in range(0, len(todo), cfg.chunk)]
    # Inline without Ray, or when no CPU is free (e.g. a run's env runners hold them all): a task that
    # cannot be scheduled would only wait for its deadline.
    if not ray.is_initialized() or ray.available_resources().get("CPU", 0.0) < 1.0:
        for k, chunk in enumerate(chunks):
            cache.add(label_chunk(dist, seed, chunk, cfg))
            log(f"labels: {min((k + 1) * cfg.chunk, len(todo))}/{len(todo)}")
        return
    task = ray.remote(num_cpus=1, max_retries=1)(label_chunk)
    limit = 2 * (cfg.energy_exact_time_limit + cfg.latency_exact_time_limit) + cfg.task_grace_s
    width = max(1, int(ray.available_resources().get("CPU", 1.0)))
    pending = list(chunks)
    running: dict[Any, tuple[list[tuple[int, str]], float]] = {}
    done = 0
    while pending or running:
        while pending and len(running) < width:
            chunk = pending.pop(0)
            running[task.remote(dist, seed, chunk, cfg)] = (chunk, time.monotonic() + limit * len(chunk))
        ready, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
        for ref in ready:
            chunk, _ = running.pop(ref)
            try:
                cache.add(ray.get(ref))
                done += len(chunk)
            except Exception as err:  # noqa: BLE001 - one failed task must not lose the others' labels
                log(f"labels: a task failed ({type(err).__name__}); retrying its instances one by one")
                pending += [[item] for item in chunk] if len(chunk) > 1 else []
        for ref, (chunk, deadline) in list(running.items()):
            if time.monotonic() > deadline:
                ray.cancel(ref, force=True)
                running.pop(ref)
                log(f"labels: a task missed its deadline; {'retrying' if len(chunk) > 1 else 'skipping'} it")
                pending += [[item] for item in chunk] if len(chunk) > 1 else []
        if ready:
            log(f"labels: {done}/{len(todo)}")
