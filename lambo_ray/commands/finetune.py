"""`lambo finetune`: ALEF fine-tuning of a pretrained policy's decoder under a named drift.

    ray job submit -- lambo finetune --checkpoint runs/pretrain --drift outage --budget 200 \\
        --query entropy --experts 2 --out runs/outage-decoder

Loads the pretrained policy (``DIR`` or ``DIR/policy``), starts a pool of expert actors on the
cluster (or an embedded local Ray), runs :func:`lambo_ray.alef.finetune.run_alef` and writes
``--out`` as a decoder-only checkpoint (``decoder.pt`` + ``decoder.json``, loadable on top of the
same encoder with ``load_decoder`` / ``lambo solve --decoder`` / Serve) plus ``metrics.json`` and
``labels.jsonl`` (every expert label of the run with its instance and provenance). The output
directory appears complete or not at all: it is assembled in a temporary sibling and renamed into
place; an existing one is only replaced with ``--overwrite``.

While it runs, ``--state-dir`` (default ``OUT.partial``) holds a journal of every label bought and
the state after the last completed round. After a crash, the same command with ``--resume``
continues from there without buying any label again; the directory is removed once ``--out`` is
written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lambo_ray.commands.common import (
    add_config_argument,
    add_scenario_arguments,
    config_file_values,
    init_ray,
    scenario_values,
)
from lambo_ray.errors import LamboInputError
from lambo_ray.flags import DataclassFlags, Flag, LazyChoices
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.scenario import ScenarioConfig


def _query_strategies() -> list[str]:
    from lambo_ray.alef.query import query_strategies

    return query_strategies()


def alef_flags() -> DataclassFlags:
    """One flag per AlefConfig field (historical short names kept); the scenario has its own group."""
    from lambo_ray.alef.config import AlefConfig

    return DataclassFlags(
        AlefConfig,
        exclude=("scenario",),
        flags={
            "drift": Flag(help="the named drift to adapt to (required, here or in --config)", default_text=""),
            "prompts": Flag(names=("--prompt", "--prompts")),
            "query": Flag(choices=LazyChoices(_query_strategies), metavar="QUERY"),
            "label_time_limit": Flag(names=("--time-limit", "--label-time-limit")),
            "label_fallbacks": Flag(names=("--fallbacks", "--label-fallbacks")),
            "label_grace_s": Flag(names=("--label-grace", "--label-grace-s")),
            "n_heldout": Flag(names=("--heldout", "--n-heldout")),
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", type=Path, help="pretrained policy (DIR or DIR/policy; default: the shipped LAMBO-S)"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory: decoder checkpoint + metrics.json")
    p.add_argument("--decoder-id", default=None, help="id of the new decoder (default: DRIFT-QUERY)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out directory (and discard the state an interrupted run left)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its state directory")
    p.add_argument("--state-dir", type=Path, default=None, help="run state while it runs (default: OUT.partial)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the driver")
    add_config_argument(p, "fine-tuning (AlefConfig; its `scenario` is the undrifted regime)")
    alef_flags().add_to(p.add_argument_group("fine-tuning"))
    add_scenario_arguments(p, drift=False)  # the undrifted scenario; the drift is --drift above


def config_from_args(args: argparse.Namespace):
    """AlefConfig from the defaults, then ``--config FILE``, then the flags given; ``drift`` is required."""
    from lambo_ray.alef.config import AlefConfig

    values = config_file_values(args, AlefConfig)
    values.update(alef_flags().values(args))
    if "drift" not in values:
        raise LamboInputError(f"--drift is required; expected one of {', '.join(DRIFTS)}", where="drift")
    if values.get("budget_per_round") is not None and values["budget_per_round"] < 1:
        raise LamboInputError(f"--budget-per-round must be >= 1 (got {values['budget_per_round']})", where="budget")
    scenario = values.get("scenario") or {}
    if not isinstance(scenario, dict):
        raise LamboInputError("scenario: expected a mapping of scenario values", where=str(args.config))
    values["scenario"] = ScenarioConfig.from_dict(scenario_values(args, scenario))
    return AlefConfig(**values)


def _check_fallbacks(names: list[str]) -> None:
    from lambo_ray.alef.worker import fallback_names

    unknown = [n for n in names if n not in fallback_names()]
    if unknown:
        raise LamboInputError(
            f"unknown fallback expert(s) {', '.join(unknown)}; expected some of {', '.join(fallback_names())}",
            where="fallbacks",
        )


def state_dir_of(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir is not None else args.out.parent / f"{args.out.name}.partial"


def _check_paths(out: Path, state: Path, overwrite: bool, resume: bool) -> None:
    """Refuse anything that would lose a finished output or an interrupted run's labels by accident."""
    from lambo_ray.mec.io import recover_dir

    recover_dir(state / "round")
    has_state = state.exists() and any(state.iterdir())
    if resume:
        if not has_state:
            what = "the run already finished" if out.exists() else "no interrupted run"
            raise LamboInputError(f"nothing to resume ({what})", where=str(state))
        return
    if has_state and not overwrite:
        raise LamboInputError(
            "an interrupted run left its labels here; pass --resume to continue it (or --overwrite to discard them)",
            where=str(state),
        )
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LamboInputError("output exists; pass --overwrite to replace it", where=str(out))
    if has_state:  # --overwrite: start afresh
        shutil.rmtree(state)


def publish(stage: Path, out: Path) -> None:
    """Rename a complete staged directory to ``out`` (old or new, never a mix: :func:`swap_in_dir`)."""
    from lambo_ray.mec.io import swap_in_dir

    swap_in_dir(stage, out)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    cfg = config_from_args(args)
    _check_fallbacks(list(cfg.label_fallbacks))
    out: Path = args.out
    state_dir = state_dir_of(args)
    _check_paths(out, state_dir, args.overwrite, args.resume)
    decoder_id = args.decoder_id or f"{cfg.drift}-{cfg.query}"

    from lambo_ray.alef.config import make_pool
    from lambo_ray.alef.finetune import run_alef
    from lambo_ray.alef.store import RunStore
    from lambo_ray.policy.checkpoint import DECODER_ID_RE, load_policy, policy_fingerprint, resolve_policy_dir

    if not DECODER_ID_RE.match(decoder_id):
        raise LamboInputError(f"decoder id {decoder_id!r} must match {DECODER_ID_RE.pattern}", where="decoder-id")
    from lambo_ray.policy.checkpoint import default_checkpoint

    policy_dir = resolve_policy_dir(args.checkpoint if args.checkpoint is not None else default_checkpoint())
    policy, _meta = load_policy(policy_dir)
    base_fp = policy_fingerprint(policy)

    init_ray()
    start = time.perf_counter()
    with make_pool(cfg) as pool:
        result = run_alef(policy, cfg, pool, log=lambda s: print(f"[alef] {s}", flush=True), store=RunStore(state_dir))
    if policy_fingerprint(policy) != base_fp:  # the frozen encoder moved: a bug, never ship such a decoder
        raise RuntimeError("encoder weights changed during decoder-only fine-tuning")
    write_output(args, cfg, result, policy, policy_dir, decoder_id, time.perf_counter() - start)
    shutil.rmtree(state_dir, ignore_errors=True)  # every label is in OUT/labels.jsonl now
    print_summary(cfg, result)
    print(f"decoder {decoder_id!r} written to {out} (metrics.json and labels.jsonl alongside)")
    return 0


def write_output(args, cfg, result, policy, policy_dir: Path, decoder_id: str, total_s: float) -> None:
    """Decoder checkpoint + metrics.json + labels.jsonl, staged and renamed into ``args.out`` at once."""
    from lambo_ray.mec.io import write_json, write_jsonl
    from lambo_ray.policy.checkpoint import policy_fingerprint, save_decoder
    from lambo_ray.results import run_metadata

    metrics: dict[str, Any] = {
        **run_metadata(),
        "checkpoint": str(policy_dir),
        "base_fingerprint": policy_fingerprint(policy),
        "decoder_id": decoder_id,
        **result.to_dict(),
        "total_s": total_s,
    }
    summary = {
        "drift": cfg.drift,
        "query": cfg.query,
        "labels_used": result.labels_used,
        "skipped": result.skipped,
        "gap_before": result.before["drifted"]["gap"],
        "gap_after": result.after["drifted"]["gap"],
        "undrifted_gap_before": result.before["undrifted"]["gap"],
        "undrifted_gap_after": result.after["undrifted"]["gap"],
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
    try:
        stage = stage_root / "out"
        save_decoder(
            stage, policy, decoder_id, meta={"alef": summary, "config": result.config, "checkpoint": str(policy_dir)}
        )
        write_json(stage / "metrics.json", metrics)
        write_jsonl(stage / "labels.jsonl", result.label_records())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp made it private; a checkpoint is meant to be shared
        publish(stage, out)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)


def print_summary(cfg, result) -> None:
    from lambo_ray.results import print_table

    rows = [
        {
            "round": 0,
            "labels": 0,
            "skipped": 0,
            "drifted_gap": result.before["drifted"]["gap"],
            "drifted_feasible": result.before["drifted"]["feasible"],
            "undrifted_gap": result.before["undrifted"]["gap"],
            "loss": None,
            "kept": None,
        }
    ]
    rows += [
        {
            "round": r.round,
            "labels": r.labels_used,
            "skipped": r.skipped,
            "drifted_gap": r.drifted["gap"],
            "drifted_feasible": r.drifted["feasible"],
            "undrifted_gap": r.undrifted["gap"],
            "loss": r.train["loss"],
            "kept": r.accepted,
        }
        for r in result.rounds
    ]
    print_table(rows, title=f"ALEF {cfg.drift} ({cfg.query} query, {result.labels_used} labels)")
