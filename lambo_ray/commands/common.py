"""Argument helpers shared by sub-commands: scenario flags, ``--config`` files, Ray start-up."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lambo_ray.config_files import load_mapping
from lambo_ray.errors import reject_unknown_keys
from lambo_ray.flags import DataclassFlags, Flag
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.scenario import ScenarioConfig, default_capacities
from lambo_ray.runtime import init_ray

__all__ = [
    "SCENARIO_FLAGS",
    "add_config_argument",
    "add_scenario_arguments",
    "config_file_values",
    "init_ray",
    "load_mapping",
    "scenario_from_args",
    "scenario_values",
]

# One flag per ScenarioConfig field; short historical names kept next to the field names.
SCENARIO_FLAGS = DataclassFlags(
    ScenarioConfig,
    prefix="sc_",
    flags={
        "capacities_cps": Flag(names=("--capacities", "--capacities-cps")),
        "area_m": Flag(names=("--area", "--area-m")),
    },
)


def add_scenario_arguments(p: argparse.ArgumentParser, *, drift: bool = True) -> None:
    """``--scenario FILE``, ``--drift NAME`` (unless the command's own config owns the drift) and one
    flag per ScenarioConfig field (``--n-ues``, ``--capacities 1.5e10 3e10``, ...)."""
    g = p.add_argument_group("scenario (defaults: the paper's cell; formulas and values in docs/model.md)")
    g.add_argument(
        "--scenario", type=Path, metavar="FILE", help="YAML/JSON file of scenario values (flags override it)"
    )
    if drift:
        g.add_argument("--drift", choices=sorted(DRIFTS), help="apply this named drift to the scenario")
    SCENARIO_FLAGS.add_to(g)


def scenario_values(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scenario field values: ``base`` (e.g. from a config file), then ``--scenario FILE``, then the
    flags. ``--n-servers`` without ``--capacities`` cycles the paper's capacities to that many servers."""
    values = dict(base or {})
    if getattr(args, "scenario", None):
        file_values = load_mapping(args.scenario)
        reject_unknown_keys(ScenarioConfig, file_values, str(args.scenario))
        values.update(file_values)
    flags = SCENARIO_FLAGS.values(args)
    values.update(flags)
    if "n_servers" in flags and "capacities_cps" not in flags:
        values["capacities_cps"] = default_capacities(int(flags["n_servers"]))
    return values


def scenario_from_args(args: argparse.Namespace) -> ScenarioConfig:
    """The scenario of the flags, with ``--drift`` applied."""
    cfg = ScenarioConfig.from_dict(scenario_values(args))
    return apply_drift(cfg, getattr(args, "drift", None))


def add_config_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"YAML/JSON file of {what} values; flags given on the command line override it, unknown keys are an error",
    )


def config_file_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The mapping of ``--config FILE`` (empty without one); keys that are not fields of ``cls`` are an
    error naming them."""
    path = getattr(args, "config", None)
    if path is None:
        return {}
    values = load_mapping(path)
    reject_unknown_keys(cls, values, str(path))
    return values
