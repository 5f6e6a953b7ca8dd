"""`lambo evaluate`: score decisions against their instances with the one evaluator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate, relative_gap
from lambo_ray.mec.io import read_decisions, read_instances
from lambo_ray.results import print_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=Path, required=True, help="instances .jsonl (lambo.instance/1 per line)")
    p.add_argument("--decisions", type=Path, required=True, help="decisions .jsonl, one per instance in the same order")
    p.add_argument("--reference", type=Path, help="reference decisions (e.g. exact) for the gap")
    p.add_argument("--json", action="store_true", help="print per-instance results as JSON")


def evaluate_files(instances_path: Path, decisions_path: Path, reference_path: Path | None = None) -> dict:
    instances = read_instances(instances_path)
    decisions = read_decisions(decisions_path)
    references = read_decisions(reference_path) if reference_path else None
    for name, docs in (("decisions", decisions), ("reference", references)):
        if docs is not None and len(docs) != len(instances):
            raise LamboInputError(f"{name} file has {len(docs)} entries but the instances file has {len(instances)}")
    per = []
    for k, (inst, dec) in enumerate(zip(instances, decisions)):
        try:
            ev = evaluate(inst, dec.target, dec.share)
        except LamboInputError as err:
            raise err.located(f"{decisions_path}:{k + 1}") from None
        row = {
            "index": k,
            "method": dec.method,
            "prompt": dec.prompt,
            "objective": ev.objective(dec.prompt),
            "feasible": ev.feasible,
            "violations": ev.violations,
            "mean_latency_s": ev.mean_latency_s,
            "total_energy_j": ev.total_energy_j,
        }
        if dec.objective is not None:
            row["claimed_objective"] = dec.objective
        if references is not None:
            ref = references[k]
            if ref.prompt != dec.prompt:
                raise LamboInputError(
                    f"reference prompt {ref.prompt!r} differs from decision prompt {dec.prompt!r}",
                    where=f"{reference_path}:{k + 1}",
                )
            ref_obj = evaluate(inst, ref.target, ref.share).objective(ref.prompt)
            row["reference_objective"] = ref_obj
            row["gap"] = relative_gap(row["objective"], ref_obj)
        per.append(row)
    objs = np.array([r["objective"] for r in per])
    summary = {
        "instances": len(per),
        "prompt": per[0]["prompt"],
        "method": per[0]["method"],
        "mean_objective": float(objs.mean()),
        "feasible_rate": float(np.mean([r["feasible"] for r in per])),
    }
    if references is not None:
        gaps = np.array([r["gap"] for r in per])
        summary.update(mean_gap=float(gaps.mean()), max_gap=float(gaps.max()))
    claimed = [r for r in per if "claimed_objective" in r]
    if claimed:
        summary["claims_match"] = bool(
            all(np.isclose(r["claimed_objective"], r["objective"], rtol=1e-6) for r in claimed)
        )
    return {"summary": summary, "instances": per}


def run(args: argparse.Namespace) -> int:
    result = evaluate_files(args.instances, args.decisions, args.reference)
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=float)
        print()
    else:
        print_table([result["summary"]], title="lambo evaluate")
    return 0
