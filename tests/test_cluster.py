"""cluster/: every file validates, broken copies fail naming the field, and the local recipe really
starts a two-node cluster, runs a job on it and stops it (slow)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from lambo_ray.cluster_validation import (
    ClusterConfigError,
    ray_launcher_schema,
    validate_file,
    validate_kuberay,
    validate_launcher,
    validate_serve_config,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [CLUSTER / "aws.yaml", *MANIFESTS], ids=lambda p: p.name)
def test_every_cluster_file_validates(path):
    kinds = validate_file(path)
    assert kinds == (["launcher"] if path.name == "aws.yaml" else [_load(path)["kind"]])


def test_the_three_kuberay_kinds_are_present_and_pin_the_installed_ray():
    docs = {_load(p)["kind"]: _load(p) for p in MANIFESTS}
    assert set(docs) == {"RayCluster", "RayJob", "RayService"}
    specs = [
        docs["RayCluster"]["spec"],
        docs["RayJob"]["spec"]["rayClusterSpec"],
        docs["RayService"]["spec"]["rayClusterConfig"],
    ]
    assert all(s["rayVersion"] == ray.__version__ for s in specs)
    assert docs["RayJob"]["spec"]["entrypoint"].split()[:2] == ["lambo", "pretrain"]


def test_launcher_config_uses_rays_own_schema_and_has_an_optional_gpu_type():
    assert ray_launcher_schema() is not None, "Ray 2.60 ships ray/autoscaler/ray-schema.json"
    cfg = _load(CLUSTER / "aws.yaml")
    gpu = [t for t, spec in cfg["available_node_types"].items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu and all(cfg["available_node_types"][t]["min_workers"] == 0 for t in gpu)
    assert any("pip install" in c and "lambo-ray" in c for c in cfg["setup_commands"])


def test_rayservice_mirrors_the_serve_config():
    """Same applications, import paths, argument keys and deployment names as serve/config.yaml (values
    such as checkpoint paths and replica counts are the cluster's own)."""
    svc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    ours = yaml.safe_load(svc["spec"]["serveConfigV2"])
    serve_cfg = ROOT / "serve" / "config.yaml"
    if not serve_cfg.exists():
        assert [a["import_path"] for a in ours["applications"]] == ["lambo_ray.serving.app:build_app"]
        return
    theirs = _load(serve_cfg)
    validate_serve_config(theirs, where=str(serve_cfg))

    def shape(cfg):
        return [
            (
                a.get("name"),
                a["import_path"],
                a.get("route_prefix"),
                sorted(a.get("args", {})),
                [d["name"] for d in a.get("deployments", [])],
            )
            for a in cfg["applications"]
        ]

    assert shape(ours) == shape(theirs)
    # The checkpoints are on the volume every pod mounts.
    mounts = {
        m["mountPath"]
        for grp in [
            svc["spec"]["rayClusterConfig"]["headGroupSpec"],
            *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
        for c in grp["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }
    for app in ours["applications"]:
        for key in ("checkpoint", "decoders_dir"):
            assert any(app["args"][key].startswith(m + "/") for m in mounts), (key, app["args"][key], mounts)


# ---------------------------------------------------------------------------- broken copies fail


def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = _split(dotted)
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


def _split(dotted: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", dotted) if p != ""]


_DELETE = object()

LAUNCHER_BREAKS = [
    ("cluster_name", _DELETE, "cluster_name"),
    ("provider.type", _DELETE, "provider.type"),
    ("head_node_type", "no_such_type", "head_node_type"),
    ("head_node_type", _DELETE, "head_node_type"),
    ("available_node_types.cpu_worker.resources", _DELETE, "available_node_types.cpu_worker.resources"),
    ("available_node_types.gpu_worker.node_config", _DELETE, "available_node_types.gpu_worker.node_config"),
    ("available_node_types.cpu_worker.resources.CPU", 1.5, "available_node_types.cpu_worker.resources.CPU"),
    ("available_node_types.cpu_worker.min_workers", 11, "available_node_types.cpu_worker.min_workers"),
    ("available_node_types.gpu_worker.max_workers", 99, "available_node_types.gpu_worker.max_workers"),
    ("max_workers", 0, "max_workers"),
    # Only Ray's JSON schema knows this one (additionalProperties: false on node types).
    ("available_node_types.cpu_worker.instance_type", "m5.large", "available_node_types.cpu_worker"),
    ("idle_timeout_minutes", "ten", "idle_timeout_minutes"),
]


@pytest.mark.parametrize("field,value,named", LAUNCHER_BREAKS, ids=[f"{b[0]}={b[1]!r}"[:60] for b in LAUNCHER_BREAKS])
def test_broken_launcher_config_fails_naming_the_field(field, value, named):
    good = _load(CLUSTER / "aws.yaml")
    validate_launcher(good)
    with pytest.raises(ClusterConfigError) as err:
        validate_launcher(_set(good, field, value), where="aws.yaml")
    assert named in str(err.value) and str(err.value).startswith("aws.yaml: ")


KUBERAY_BREAKS = [
    ("raycluster.yaml", "apiVersion", "ray.io/v1alpha1", "apiVersion"),
    ("raycluster.yaml", "kind", "RayClusterz", "kind"),
    ("raycluster.yaml", "metadata.name", "Lambo_Ray", "metadata.name"),
    ("raycluster.yaml", "spec.headGroupSpec.rayStartParams", _DELETE, "spec.headGroupSpec.rayStartParams"),
    (
        "raycluster.yaml",
        "spec.headGroupSpec.rayStartParams.num-cpus",
        0,
        "spec.headGroupSpec.rayStartParams.num-cpus",
    ),
    (
        "raycluster.yaml",
        "spec.headGroupSpec.template.spec.containers[0].image",
        _DELETE,
        "spec.headGroupSpec.template.spec.containers[0].image",
    ),
    (
        "raycluster.yaml",
        "spec.headGroupSpec.template.spec.containers",
        [],
        "spec.headGroupSpec.template.spec.containers",
    ),
    ("raycluster.yaml", "spec.workerGroupSpecs[0].groupName", _DELETE, "spec.workerGroupSpecs[0].groupName"),
    ("raycluster.yaml", "spec.workerGroupSpecs[1].groupName", "cpu", "spec.workerGroupSpecs[1].groupName"),
    (
        "raycluster.yaml",
        "spec.workerGroupSpecs[0].maxReplicas",
        _DELETE,
        "spec.workerGroupSpecs[0].maxReplicas",
    ),
    ("raycluster.yaml", "spec.workerGroupSpecs[0].minReplicas", 20, "spec.workerGroupSpecs[0].minReplicas"),
    ("raycluster.yaml", "spec.workerGroupSpecs[0].replicas", 50, "spec.workerGroupSpecs[0].replicas"),
    (
        "raycluster.yaml",
        "spec.workerGroupSpecs[1].template.spec.containers[0].image",
        "",
        "spec.workerGroupSpecs[1].template.spec.containers[0].image",
    ),
    ("rayjob-pretrain.yaml", "spec.entrypoint", "  ", "spec.entrypoint"),
    ("rayjob-pretrain.yaml", "spec.rayClusterSpec", _DELETE, "spec.rayClusterSpec"),
    ("rayjob-pretrain.yaml", "spec.shutdownAfterJobFinishes", "yes", "spec.shutdownAfterJobFinishes"),
    (
        "rayjob-pretrain.yaml",
        "spec.rayClusterSpec.workerGroupSpecs[0].replicas",
        -1,
        "spec.rayClusterSpec.workerGroupSpecs[0].replicas",
    ),
    ("rayservice.yaml", "spec.serveConfigV2", _DELETE, "spec.serveConfigV2"),
    ("rayservice.yaml", "spec.serveConfigV2", "applications: [\n", "spec.serveConfigV2"),
    (
        "rayservice.yaml",
        "spec.serveConfigV2",
        "applications:\n  - name: x\n    import_path: serving/app.py\n",
        "applications[0].import_path",
    ),
    ("rayservice.yaml", "spec.serveConfigV2", "http_options: {}\n", "applications"),
    # Only Ray Serve's schema catches this one (num_replicas must be an int or "auto").
    (
        "rayservice.yaml",
        "spec.serveConfigV2",
        "applications:\n  - name: x\n    import_path: a.b:c\n"
        "    deployments:\n      - name: D\n        num_replicas: many\n",
        "ServeDeploySchema",
    ),
    (
        "rayservice.yaml",
        "spec.rayClusterConfig.headGroupSpec.template",
        _DELETE,
        "spec.rayClusterConfig.headGroupSpec.template",
    ),
]


@pytest.mark.parametrize(
    "fname,field,value,named", KUBERAY_BREAKS, ids=[f"{b[0]}:{b[1]}={b[2]!r}"[:70] for b in KUBERAY_BREAKS]
)
def test_broken_kuberay_manifest_fails_naming_the_field(fname, field, value, named):
    good = _load(CLUSTER / "kuberay" / fname)
    validate_kuberay(good)
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay(_set(good, field, value), where=fname)
    assert named in str(err.value) and str(err.value).startswith(f"{fname}: ")


def test_validate_file_recognises_serve_configs(tmp_path):
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text("applications:\n  - name: a\n    import_path: lambo_ray.serving.app:build_app\n")
    assert validate_file(serve_cfg) == ["serve"]
    serve_cfg.write_text("applications:\n  - name: a\n    import_path: serving/app.py\n")
    with pytest.raises(ClusterConfigError, match=r"serve.yaml: applications\[0\].import_path"):
        validate_file(serve_cfg)


def test_validate_file_reports_unparsable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ClusterConfigError, match="bad.yaml: not valid YAML"):
        validate_file(bad)
    with pytest.raises(ClusterConfigError, match="file not found"):
        validate_file(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------ local two-node recipe


def _free_port_base(span: int = 400) -> int:
    """A base port whose whole [base, base+span) range is free right now (the recipe uses base..base+349)."""
    for base in range(20000 + (os.getpid() % 50) * 400, 60000, span):
        socks = []
        try:
            for port in range(base, base + span):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.mark.slow
def test_local_recipe_runs_a_job_on_two_nodes_and_stops_them(tmp_path):
    assert shutil.which("ray"), "the ray CLI must be on PATH"
    env = dict(os.environ, LAMBO_PORT_BASE=str(_free_port_base()), LAMBO_LOCAL_TIMEOUT="300")
    env.pop("RAY_ADDRESS", None)
    job = (
        "import ray; ray.init(); "
        "print('NODES', sum(n['Alive'] for n in ray.nodes()), 'CPUS', int(ray.cluster_resources()['CPU']))"
    )
    proc = subprocess.run(
        ["bash", str(CLUSTER / "local.sh"), "python", "-c", job],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "NODES 2 CPUS 2" in out, out[-3000:]
    # Everything the recipe started is gone: its `ray start --block` processes were its children.
    pids = re.search(r"stopping the cluster \(worker (\d+), head (\d+)\)", out)
    assert pids, out[-2000:]
    for pid in map(int, pids.groups()):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    tmp = re.search(r"temp dir (\S+)", out).group(1)
    assert not Path(tmp).exists()


@pytest.mark.slow
def test_local_recipe_reports_a_failed_job(tmp_path):
    env = dict(os.environ, LAMBO_PORT_BASE=str(_free_port_base()), LAMBO_LOCAL_TIMEOUT="300")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(CLUSTER / "local.sh"), "python", "-c", "raise SystemExit(3)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "did not succeed" in proc.stderr
