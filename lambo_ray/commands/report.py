"""`lambo report`: the reproduction report (tables, plots, JSON) from trained checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from lambo_ray.commands.common import add_scenario_arguments, scenario_from_args
from lambo_ray.errors import LamboInputError
from lambo_ray.flags import DataclassFlags
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.io import read_instances
from lambo_ray.report import COMPARISON_COLUMNS, DRIFT_COLUMNS, PolicySource, ReportConfig, build_report
from lambo_ray.results import print_table

REPORT_FLAGS = DataclassFlags(ReportConfig, exclude=("scenario",))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output directory (report.md, report.json, PNGs)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="pretrained LAMBO checkpoint (from `lambo pretrain`; default: the shipped LAMBO-S)",
    )
    p.add_argument(
        "--decoders",
        nargs="*",
        default=[],
        metavar="DRIFT=DIR",
        help="ALEF decoder checkpoints per drift, e.g. outage=runs/ft_outage",
    )
    p.add_argument("--instances", type=Path, help="held-out instances file (default: generated, seeded)")
    REPORT_FLAGS.add_to(p.add_argument_group("report (ReportConfig)"))
    add_scenario_arguments(p)


def parse_decoders(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in DRIFTS:
            raise LamboInputError(f"--decoders expects DRIFT=DIR with DRIFT in {', '.join(DRIFTS)} (got {item!r})")
        if not Path(path).exists():
            raise LamboInputError(f"decoder checkpoint not found: {path}")
        out[name] = Path(path)
    return out


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise LamboInputError(f"checkpoint not found: {args.checkpoint}")
    instances = read_instances(args.instances) if args.instances else None
    cfg = ReportConfig(**REPORT_FLAGS.values(args), scenario=scenario_from_args(args))
    if cfg.count < 2:
        raise LamboInputError("--count must be >= 2 (confidence intervals need two samples)")
    result = build_report(
        args.out, PolicySource(args.checkpoint, parse_decoders(args.decoders)), cfg, instances=instances
    )
    if "comparison" in result:
        print_table(result["comparison"], COMPARISON_COLUMNS, title="Comparison (gap to exact in %)")
    if "drift" in result:
        print_table(result["drift"], DRIFT_COLUMNS, title="Drift: before / after ALEF")
    print(f"report written to {args.out / 'report.md'}")
    return 0
