"""Instance/decision files and the CLI's handling of bad input: one line naming the problem, exit 2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from lambo_ray.cli import main
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import Decision
from lambo_ray.mec.io import (
    decision_from_dict,
    decision_to_dict,
    instance_from_dict,
    instance_to_dict,
    read_decisions,
    read_instances,
    write_decisions,
    write_instances,
)
from lambo_ray.mec.scenario import ScenarioConfig


@pytest.fixture(scope="module")
def good_doc():
    return instance_to_dict(generate_many(ScenarioConfig(n_ues=4, n_servers=2, capacities_cps=(1e10, 2e10)), 1, 0)[0])


def test_round_trip(tmp_path):
    insts = generate_many(ScenarioConfig(), 3, 1)
    write_instances(tmp_path / "i.jsonl", insts)
    back = read_instances(tmp_path / "i.jsonl")
    for a, b in zip(insts, back):
        for f in ("data_bits", "cycles", "deadline_s", "local_cps", "rate_bps", "capacity_cps"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    dec = Decision(
        target=np.array([0, 1]),
        share=np.array([0.0, 0.5]),
        prompt="min_energy",
        method="x",
        objective=1.5,
        stats={"wall_s": 0.1},
    )
    write_decisions(tmp_path / "d.jsonl", [dec])
    got = read_decisions(tmp_path / "d.jsonl")[0]
    assert got.target.tolist() == [0, 1] and got.share.tolist() == [0.0, 0.5] and got.objective == 1.5
    assert decision_to_dict(got)["schema"] == "lambo.decision/1"


def _mutations():
    def drop(path):
        def f(d):
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]

        return f

    def setv(path, value):
        def f(d):
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value(obj[path[-1]]) if callable(value) else value

        return f

    return {
        "missing field": (drop(["ues", "cycles"]), "missing field 'ues.cycles'"),
        "missing servers": (drop(["servers"]), "missing field 'servers'"),
        "wrong schema": (setv(["schema"], "lambo.instance/0"), "schema"),
        "short list": (setv(["ues", "deadline_s"], lambda v: v[:-1]), "deadline_s has 3 entries"),
        "rate width": (
            setv(["ues", "rate_bps"], lambda v: [r[:1] for r in v]),
            "ues.rate_bps[0] has 1 entries",
        ),
        "nan": (setv(["ues", "cycles"], lambda v: [float("nan")] + v[1:]), "ues.cycles"),
        "inf": (setv(["servers", "capacity_cps"], lambda v: [float("inf")] + v[1:]), "servers.capacity_cps"),
        "negative size": (setv(["ues", "data_bits"], lambda v: [-1.0] + v[1:]), "ues.data_bits"),
        "negative rate": (setv(["ues", "rate_bps"], lambda v: [[-5.0] + v[0][1:]] + v[1:]), "rate_bps"),
        "zero UEs": (lambda d: d["ues"].update({k: [] for k in d["ues"]}), "ues."),
        "string number": (setv(["power", "tx_w"], "1.0"), "power.tx_w"),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_bad_instance_names_the_field(good_doc, name):
    mutate, expected = _mutations()[name]
    doc = copy.deepcopy(good_doc)
    mutate(doc)
    with pytest.raises(LamboInputError) as err:
        instance_from_dict(doc)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_decision_fields():
    ok = {
        "schema": "lambo.decision/1",
        "prompt": "min_energy",
        "target": [0, 1],
        "share": [0.0, 0.5],
        "objective": 1.0,
        "method": "x",
    }
    decision_from_dict(ok)
    for change, expected in [
        ({"prompt": "min_cost"}, "prompt"),
        ({"target": [0, -1]}, "target"),
        ({"share": [0.0, 1.5]}, "share"),
        ({"share": [0.0]}, "share has 1"),
    ]:
        with pytest.raises(LamboInputError, match=expected):
            decision_from_dict({**ok, **change})


def _write_lines(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_cli_bad_files_exit_2_one_line(tmp_path, good_doc, capsys):
    bad = copy.deepcopy(good_doc)
    bad["ues"]["cycles"][2] = float("nan")
    _write_lines(tmp_path / "nan.jsonl", [good_doc, bad])
    (tmp_path / "broken.jsonl").write_text(json.dumps(good_doc) + "\n{not json\n")
    cases = [
        (["evaluate", "--instances", str(tmp_path / "missing.jsonl"), "--decisions", "x"], "file not found"),
        (
            [
                "solve",
                "--method",
                "greedy",
                "--prompt",
                "min_energy",
                "--in",
                str(tmp_path / "nan.jsonl"),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            "nan.jsonl:2",
        ),
        (
            [
                "solve",
                "--method",
                "greedy",
                "--prompt",
                "min_energy",
                "--in",
                str(tmp_path / "broken.jsonl"),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            "broken.jsonl:2: invalid JSON",
        ),
        (
            [
                "solve",
                "--method",
                "greedy",
                "--prompt",
                "min_cost",
                "--in",
                str(tmp_path / "nan.jsonl"),
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
            "argument --prompt: invalid choice: 'min_cost'",
        ),
        (
            ["generate", "--count", "2", "--n-ues", "0", "--out", str(tmp_path / "g.jsonl")],
            "n_ues must be >= 1",
        ),
        (
            [
                "generate",
                "--count",
                "2",
                "--n-servers",
                "3",
                "--capacities",
                "1e10",
                "--out",
                str(tmp_path / "g.jsonl"),
            ],
            "capacities_cps has 1 values",
        ),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()  # nothing written on bad input


def test_cli_evaluate_decision_shape_mismatch(tmp_path, good_doc, capsys):
    _write_lines(tmp_path / "i.jsonl", [good_doc])
    _write_lines(
        tmp_path / "d.jsonl",
        [
            {
                "schema": "lambo.decision/1",
                "prompt": "min_energy",
                "target": [0, 0],
                "share": [0, 0],
                "method": "x",
            }
        ],
    )
    assert main(["evaluate", "--instances", str(tmp_path / "i.jsonl"), "--decisions", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:1" in err and "target has shape (2,), expected (4,)" in err


def test_cli_generate_evaluate_round_trip(tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--count", "3", "--seed", "5", "--drift", "outage", "--out", str(out)]) == 0
    insts = read_instances(out)
    assert len(insts) == 3 and insts[0].n_ues == 50
    decs = [
        Decision(
            target=np.zeros(50, int),
            share=np.zeros(50),
            prompt="min_energy",
            method="all_local",
            objective=float(i.local_w * i.local_latency().sum()),
        )
        for i in insts
    ]
    write_decisions(tmp_path / "d.jsonl", decs)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--instances",
                str(out),
                "--decisions",
                str(tmp_path / "d.jsonl"),
                "--reference",
                str(tmp_path / "d.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["summary"]["mean_gap"] == 0.0 and result["summary"]["claims_match"]
    assert result["instances"][0]["objective"] == pytest.approx(decs[0].objective)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lambo_ray.cli",
            "solve",
            "--method",
            "greedy",
            "--prompt",
            "min_latency",
            "--in",
            str(tmp_path / "nope.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "file not found" in proc.stderr and "Traceback" not in proc.stderr
