"""`lambo report`: the reproduction report (tables, plots, JSON) from trained checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from lambo_ray.commands.common import add_scenario_arguments, scenario_from_args
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.io import read_instances
from lambo_ray.report import COMPARISON_COLUMNS, DRIFT_COLUMNS, PolicySource, ReportConfig, build_report
from lambo_ray.results import print_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output directory (report.md, report.json, PNGs)")
    p.add_argument("--checkpoint", type=Path, help="pretrained LAMBO checkpoint (from `lambo pretrain`)")
    p.add_argument(
        "--decoders",
        nargs="*",
        default=[],
        metavar="DRIFT=DIR",
        help="ALEF decoder checkpoints per drift, e.g. outage=runs/ft_outage",
    )
    p.add_argument("--count", type=int, default=ReportConfig.count, help="held-out instances per prompt")
    p.add_argument("--instances", type=Path, help="held-out instances file (default: generated, seeded)")
    p.add_argument("--drifts", nargs="+", default=list(ReportConfig.drifts), choices=sorted(DRIFTS))
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(ReportConfig.sections),
        choices=["comparison", "drift", "scaling"],
    )
    p.add_argument("--methods", nargs="+", default=list(ReportConfig.methods))
    p.add_argument("--exact-time-limit", type=float, default=ReportConfig.exact_time_limit)
    p.add_argument("--drift-count", type=int, default=ReportConfig.drift_count)
    p.add_argument("--scaling-n", type=int, nargs="+", default=list(ReportConfig.scaling_n))
    p.add_argument("--scaling-m", type=int, nargs="+", default=list(ReportConfig.scaling_m))
    p.add_argument("--scaling-count", type=int, default=ReportConfig.scaling_count)
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
    if args.count < 2:
        raise LamboInputError("--count must be >= 2 (confidence intervals need two samples)")
    instances = read_instances(args.instances) if args.instances else None
    cfg = ReportConfig(
        scenario=scenario_from_args(args),
        drifts=tuple(args.drifts),
        count=args.count,
        sections=tuple(args.sections),
        methods=tuple(args.methods),
        exact_time_limit=args.exact_time_limit,
        drift_count=args.drift_count,
        scaling_n=tuple(args.scaling_n),
        scaling_m=tuple(args.scaling_m),
        scaling_count=args.scaling_count,
    )
    result = build_report(
        args.out, PolicySource(args.checkpoint, parse_decoders(args.decoders)), cfg, instances=instances
    )
    if "comparison" in result:
        print_table(result["comparison"], COMPARISON_COLUMNS, title="Comparison (gap to exact in %)")
    if "drift" in result:
        print_table(result["drift"], DRIFT_COLUMNS, title="Drift: before / after ALEF")
    print(f"report written to {args.out / 'report.md'}")
    return 0
