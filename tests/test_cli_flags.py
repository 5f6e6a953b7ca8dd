"""The command line: every option of every sub-command has a help text, flags are generated from the config
dataclasses (types, choices, defaults), ``--config FILE`` is overridden by flags, and the historical flag
names keep working."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from lambo_ray.cli import main
from lambo_ray.commands import COMMANDS, CommandParser, build_parser, command_module
from lambo_ray.flags import DataclassFlags, Flag
from lambo_ray.mec.scenario import ScenarioConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_of_every_command_has_a_help_text(name):
    missing = [
        "/".join(a.option_strings)
        for a in _subparser(name)._actions
        if a.option_strings and not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)
    ]
    assert not missing, f"lambo {name}: options without help: {missing}"
    _subparser(name).format_help()  # every help string formats (no stray %)


def test_the_top_level_parser_has_help_for_every_command():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in sub._choices_actions} == set(COMMANDS)
    assert all(c.help for c in sub._choices_actions)


def test_solve_help_lists_the_installed_decode_strategies(capsys):
    from lambo_ray.policy.decoding import available_strategies

    with pytest.raises(SystemExit) as done:
        main(["solve", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--time-budget-ms FLOAT" in text
    assert "decoding strategy, one of " + ", ".join(available_strategies()) in text
    # and a strategy the policy does not have is a one-line usage error
    assert (
        main(["solve", "--method", "lambo", "--prompt", "min_energy", "--in", "x", "--out", "y", "--decode", "nope"])
        == 2
    )
    assert "invalid choice: 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ generated flags


@dataclasses.dataclass
class _Demo:
    rate: float = dataclasses.field(default=0.5, metadata={"help": "a rate (%)"})
    count: int | None = dataclasses.field(default=None, metadata={"help": "a count"})
    mode: str = dataclasses.field(default="a", metadata={"help": "a mode", "choices": ("a", "b")})
    pair: tuple[float, float] = dataclasses.field(default=(1.0, 2.0), metadata={"help": "a pair"})
    many: tuple[str, ...] = dataclasses.field(default=("x",), metadata={"help": "names", "choices": ("x", "y")})
    table: dict[str, float] = dataclasses.field(default_factory=dict, metadata={"help": "a mapping"})
    on: bool = dataclasses.field(default=True, metadata={"help": "a switch"})
    renamed_ms: float = dataclasses.field(default=0.005, metadata={"help": "seconds"})


def _demo_parser():
    flags = DataclassFlags(
        _Demo, flags={"renamed_ms": Flag(names=("--wait-ms",), convert=lambda ms: ms / 1e3, help="milliseconds")}
    )
    p = CommandParser(prog="demo")  # errors are one-line UsageErrors
    flags.add_to(p)
    return p, flags


def test_generated_flags_parse_each_field_type():
    p, flags = _demo_parser()
    argv = "--rate 0.25 --count none --mode b --pair 3 4 --many x y --table a=1 b=2e-3 --no-on --wait-ms 20"
    values = flags.values(p.parse_args(argv.split()))
    assert values == {
        "rate": 0.25,
        "count": None,
        "mode": "b",
        "pair": (3.0, 4.0),
        "many": ("x", "y"),
        "table": {"a": 1, "b": 0.002},
        "on": False,
        "renamed_ms": 0.02,
    }
    assert flags.values(p.parse_args([])) == {}  # nothing given: nothing overrides a file
    assert flags.values(p.parse_args(["--on", "false"])) == {"on": False}
    assert flags.values(p.parse_args(["--on"])) == {"on": True}
    assert flags.values(p.parse_args(["--count", "7"])) == {"count": 7}


@pytest.mark.parametrize(
    "argv,message",
    [
        ("--mode c", "invalid choice: 'c'"),
        ("--many x z", "invalid choice: 'z'"),
        ("--pair 1", "expected 2 arguments"),
        ("--count seven", "invalid int or none value"),
        ("--table a", "expected KEY=VALUE"),
        ("--on maybe", "expected true or false"),
        ("--rate nan", "expected a finite number"),
        ("--pair 1 inf", "expected a finite number"),
    ],
)
def test_generated_flags_reject_bad_values_in_one_line(argv, message):
    from lambo_ray.commands import UsageError

    p, _ = _demo_parser()
    with pytest.raises(UsageError, match=message) as err:
        p.parse_args(argv.split())
    assert "\n" not in str(err.value)


def test_generated_help_shows_defaults_and_escapes_percent():
    p, _ = _demo_parser()
    text = " ".join(p.format_help().split())
    assert "a rate (%) (default: 0.5)" in text
    assert "--pair PAIR PAIR a pair (default: 1 2)" in text
    assert "--mode {a,b}" in text and "each one of: x, y" in text
    assert "--on [BOOL], --no-on [BOOL] a switch (default: true)" in text


def test_a_field_without_help_is_a_programming_error():
    @dataclasses.dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match="NoHelp.x has no help text"):
        DataclassFlags(NoHelp).add_to(argparse.ArgumentParser())


def test_every_scenario_field_has_a_flag_with_the_paper_default():
    p = _subparser("generate")
    by_dest = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(ScenarioConfig):
        action = by_dest[f"sc_{f.name}"]
        assert action.help and "default" in action.help, f.name


# ------------------------------------------------------------------------------ --config files


def test_pretrain_config_file_is_overridden_by_flags(tmp_path):
    from lambo_ray.commands.pretrain import config_from_args

    cfg_file = tmp_path / "pre.yaml"
    cfg_file.write_text(
        "lr: 3e-4\niterations: 7\nentropy_bonus: false\nprompts: [min_energy]\n"
        "scenario: {n_ues: 10, n_servers: 2, capacities_cps: [1.0e10, 2.0e10]}\n"
    )
    argv = ["pretrain", "--out", str(tmp_path / "run"), "--config", str(cfg_file)]
    from_file = config_from_args(build_parser("pretrain").parse_args(argv))
    assert (from_file.lr, from_file.iterations, from_file.entropy_bonus) == (3e-4, 7, False)
    assert from_file.prompts == ("min_energy",) and (from_file.n_max, from_file.m_max) == (10, 2)
    assert from_file.num_epochs == 4  # untouched: the dataclass default

    argv += ["--iterations", "3", "--entropy-bonus", "--n-ues", "12", "--epochs", "2", "--drift", "load"]
    argv += ["--policy-overrides", "enc_layers=2", "--val-expert", "none", "--threads", "2"]
    cfg = config_from_args(build_parser("pretrain").parse_args(argv))
    assert (cfg.lr, cfg.iterations, cfg.entropy_bonus, cfg.num_epochs) == (3e-4, 3, True, 2)
    assert cfg.scenario["n_ues"] == 12 and cfg.scenario["n_servers"] == 2 and cfg.n_max == 12
    assert cfg.drift == "load" and cfg.scenario_config().mean_cycles == 1.5e10
    assert cfg.policy_overrides == {"enc_layers": 2} and cfg.val_expert is None and cfg.driver_threads == 2


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_unknown_keys_in_a_config_file_are_named(tmp_path, capsys, command):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "colour": "red", "sizee": 3}))
    argv = [command, "--out", str(tmp_path / "o"), "--config", str(bad)]
    if command == "finetune":
        argv += ["--checkpoint", str(tmp_path), "--drift", "load"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key(s) colour, sizee" in err and str(bad) in err and len(err.splitlines()) == 1


def test_finetune_config_file_and_flags(tmp_path, capsys):
    from lambo_ray.commands.finetune import config_from_args

    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("drift: outage\nbudget: 40\nrounds: 2\ngate: false\nscenario: {n_ues: 8, n_servers: 2}\n")
    base = ["finetune", "--checkpoint", "c", "--out", "o", "--config", str(cfg_file)]
    cfg = config_from_args(build_parser("finetune").parse_args(base + ["--budget", "12", "--heldout", "5"]))
    assert (cfg.drift, cfg.budget, cfg.rounds, cfg.gate, cfg.n_heldout) == ("outage", 12, 2, False, 5)
    assert cfg.scenario.n_ues == 8 and cfg.scenario.capacities_cps == (1.5e10, 1.5e10)  # paper's, cycled
    cfg = config_from_args(build_parser("finetune").parse_args(base + ["--drift", "load", "--gate", "--n-ues", "9"]))
    assert cfg.drift == "load" and cfg.gate and cfg.scenario.n_ues == 9
    # without a drift in the file or on the command line
    assert main(["finetune", "--checkpoint", "c", "--out", str(tmp_path / "o")]) == 2
    assert "--drift is required" in capsys.readouterr().err


def test_serve_flags_map_onto_serve_config(tmp_path):
    from lambo_ray.commands.serve import config_from_args

    argv = ["serve", "--checkpoint", str(tmp_path), "--no-batching", "--batch-wait-ms", "20", "--cache-size", "2"]
    cfg = config_from_args(build_parser("serve").parse_args(argv + ["--max-k", "9", "--decoders", str(tmp_path)]))
    assert cfg.batching is False and cfg.batch_wait_timeout_s == pytest.approx(0.02)
    assert (cfg.decoder_cache_size, cfg.max_k, cfg.policy_replicas) == (2, 9, None)  # None: auto when it starts
    assert cfg.decoders_dir == str(tmp_path.resolve())
    for replicas, expected in (("auto", None), ("3", 3)):
        parsed = build_parser("serve").parse_args(argv + ["--replicas", replicas])
        assert config_from_args(parsed).policy_replicas == expected


@pytest.mark.parametrize("bad", ["0", "-1", "many", "1.5"])
def test_serve_replicas_must_be_a_count_or_auto(bad, capsys):
    assert main(["serve", f"--replicas={bad}"]) == 2
    assert f"must be an integer >= 1 or auto (got {bad!r})" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("free_cpus", "per_replica", "expected"),
    [(2.0, 1.0, 2), (3.5, 1.0, 3), (0.5, 1.0, 1), (64.0, 1.0, 8), (4.0, 2.0, 2), (3.0, 0.0, 3)],
)
def test_auto_replicas_fill_the_free_cpus_up_to_a_cap(free_cpus, per_replica, expected, monkeypatch):
    import ray

    from lambo_ray.commands.serve import auto_replicas

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free_cpus})
    assert auto_replicas(per_replica) == expected


LEGACY_FLAGS = {
    "generate": "--n-ues --n-servers --count --seed --drift --out --capacities --area --series --dt --scenario",
    "solve": "--method --prompt --in --out --time-limit --checkpoint --decoder --decode --k --seed --quiet",
    "evaluate": "--instances --decisions --reference --json",
    "pretrain": "--out --resume --scale --iterations --num-env-runners --num-envs-per-env-runner "
    "--instances-per-episode --train-batch-size --minibatch-size --epochs --lr --clip-param "
    "--entropy-coeff-target --entropy-coeff-share --no-entropy-bonus --critic --ratio --share-credit --penalty "
    "--prompt --n-max --m-max --seed --val-size --val-expert --eval-every --checkpoint-every "
    "--warm-start-labels --warm-start-epochs --warm-start-prompts --threads --quiet",
    "finetune": "--checkpoint --out --budget --budget-per-round --rounds --pool-size --query --experts --time-limit "
    "--prompt --epochs --batch-size --lr --replay-fraction --n-replay --heldout --target-weight --share-weight "
    "--seed --decoder-id --overwrite --no-gate --threads --drift",
    "tune": "--config --storage --name --num-samples --max-concurrent --resume --num-cpus --json --quiet",
    "serve": "--checkpoint --decoders --host --port --replicas --no-batching --max-batch-size --batch-wait-ms "
    "--max-ues --max-body-bytes --cache-size --num-cpus --blocking",
    "report": "--out --checkpoint --decoders --count --instances --drifts --sections --methods --exact-time-limit "
    "--drift-count --scaling-n --scaling-m --scaling-count",
    "demo": "--out --drift --count --iterations --warm-start-labels --budget --tiny --overwrite",
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_historical_flag_names_still_exist(name):
    known = {s for a in _subparser(name)._actions for s in a.option_strings}
    assert not set(LEGACY_FLAGS[name].split()) - known
    assert hasattr(command_module(name), "run")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=str)
def test_shipped_pretrain_configs_load_through_the_command_line(path, tmp_path):
    from lambo_ray.commands.pretrain import config_from_args
    from lambo_ray.config_files import load_mapping

    argv = ["pretrain", "--out", str(tmp_path / "run"), "--config", str(path), "--iterations", "1"]
    cfg = config_from_args(build_parser("pretrain").parse_args(argv))
    file_values = load_mapping(path)
    assert cfg.iterations == 1
    for key, value in file_values.items():
        if key != "iterations" and not isinstance(value, (dict, list)):
            assert getattr(cfg, key) == value, key
