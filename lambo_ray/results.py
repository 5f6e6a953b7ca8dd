"""Tables and result files shared by the CLI, benchmarks and the report.

Every benchmark writes ``benchmarks/results/<name>.json`` with the command, git revision, machine
and date next to its rows, so a number in the README can be traced to the run that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.mec.io import write_json


def run_metadata() -> dict[str, Any]:
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_revision": rev,
        "machine": machine_description(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str | os.PathLike, rows: list[dict[str, Any]], **extra: Any) -> Path:
    p = Path(path)
    write_json(p, {**run_metadata(), **extra, "rows": rows})
    return p


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None, file=None
) -> None:
    """A rich table on a terminal; plain Markdown when output is redirected (so logs stay greppable)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    if not console.is_terminal:
        if title:
            print(f"\n{title}\n", file=file or sys.stdout)
        print(markdown_table(rows, columns), file=file or sys.stdout)
        return
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    console.print(table)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of a normal-approximation 95% confidence interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(x.size))


def machine_description() -> str:
    """Host name, architecture, CPU count and processor of this machine, for result files."""
    proc = platform.processor() or ""
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {proc}".strip()
