"""Argument helpers shared by sub-commands: scenario flags generated from ScenarioConfig, Ray start-up."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.scenario import ScenarioConfig, default_capacities

_SHORT = {
    "n_ues": "--n-ues",
    "n_servers": "--n-servers",
    "capacities_cps": "--capacities",
    "area_m": "--area",
}


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per ScenarioConfig field (``--mean-cycles``, ``--capacities 1.5e10 3e10``, ...), plus
    ``--scenario FILE.yaml`` and ``--drift NAME``. Defaults come from the dataclass (the paper)."""
    g = p.add_argument_group("scenario (defaults: the paper scenario, SPEC section 1)")
    g.add_argument("--scenario", type=Path, help="YAML/JSON file of scenario values (flags override it)")
    g.add_argument("--drift", choices=sorted(DRIFTS), help="apply a named drift scenario")
    for f in dataclasses.fields(ScenarioConfig):
        flag = _SHORT.get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default
        if isinstance(default, tuple) or f.name == "hotspot":
            g.add_argument(flag, dest=f"sc_{f.name}", type=float, nargs="+", default=None, help=f"default {default}")
        elif isinstance(default, bool):
            g.add_argument(
                flag,
                dest=f"sc_{f.name}",
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=None,
                help=f"default {default}",
            )
        else:
            g.add_argument(flag, dest=f"sc_{f.name}", type=type(default), default=None, help=f"default {default}")


def scenario_from_args(args: argparse.Namespace) -> ScenarioConfig:
    values: dict[str, Any] = {}
    if getattr(args, "scenario", None):
        values.update(load_mapping(args.scenario))
    for f in dataclasses.fields(ScenarioConfig):
        v = getattr(args, f"sc_{f.name}", None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    if "n_servers" in values and "capacities_cps" not in values:
        values["capacities_cps"] = default_capacities(int(values["n_servers"]))
    cfg = ScenarioConfig.from_dict(values)
    return apply_drift(cfg, getattr(args, "drift", None))


def load_mapping(path: Path) -> dict[str, Any]:
    import json

    import yaml

    if not Path(path).exists():
        raise LamboInputError(f"file not found: {path}")
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise LamboInputError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LamboInputError(f"{path}: expected a mapping at the top level")
    return data


def init_ray(num_cpus: int | None = None, **kwargs: Any):
    """Connect to the cluster when RAY_ADDRESS is set (e.g. under `ray job submit`), else start an
    embedded local Ray. Passing num_cpus to a cluster connection is an error in Ray, so it is dropped."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray
