"""Offline checks of the files in cluster/: Ray cluster launcher YAML and KubeRay manifests.

Why: a typo in a cluster file is otherwise found by `ray up` or the KubeRay operator minutes into a
deployment (or never: the operator silently ignores some mistakes). These checks run in
milliseconds in CI and name the offending field.

Launcher configs are checked three ways: explicit checks of the fields this project relies on (so
the message is short and names the field), Ray's own JSON schema shipped with the installed Ray
(``ray/autoscaler/ray-schema.json``, validated with ``jsonschema``), and Ray's own
``prepare_config`` + ``validate_config`` (defaults filled in, node-type consistency), i.e. exactly
what ``ray up`` runs before it touches the cloud. KubeRay manifests (``ray.io/v1`` RayCluster,
RayJob, RayService) are checked against the fields the CRDs require; a RayService's
``serveConfigV2`` is parsed and validated with Ray Serve's own ``ServeDeploySchema``.

Usage: ``python -m lambo_ray.cluster_validation cluster/aws.yaml cluster/kuberay/*.yaml serve/config.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lambo_ray.errors import LamboInputError

KUBERAY_API_VERSION = "ray.io/v1"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


class ClusterConfigError(LamboInputError):
    """A cluster file breaks a rule of Ray's launcher or of KubeRay; the message names the field."""


# --------------------------------------------------------------------------------------------- files


def validate_file(path: str | Path) -> list[str]:
    """Validate every YAML document of ``path``; return what each one was (``"launcher"``, ``"RayJob"``,
    ``"serve"``...).

    A document with ``apiVersion``/``kind`` is a Kubernetes manifest, one with ``applications`` a Serve
    config (``serve run`` / ``serve deploy``), anything else a launcher config.
    """
    path = Path(path)
    if not path.exists():
        raise ClusterConfigError("file not found", where=str(path))
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"not valid YAML: {str(err).splitlines()[0]}", where=str(path)) from None
    if not docs:
        raise ClusterConfigError("no YAML document", where=str(path))
    kinds = []
    for i, doc in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path}[doc {i}]"
        if isinstance(doc, dict) and ("apiVersion" in doc or "kind" in doc):
            validate_kuberay(doc, where=where)
            kinds.append(str(doc["kind"]))
        elif isinstance(doc, dict) and "applications" in doc and "cluster_name" not in doc:
            validate_serve_config(doc, where=where)
            kinds.append("serve")
        else:
            validate_launcher(doc, where=where)
            kinds.append("launcher")
    return kinds


# ------------------------------------------------------------------------------------------ launcher


def ray_launcher_schema() -> dict[str, Any] | None:
    """The JSON schema the installed Ray validates launcher configs with (None if it ships none)."""
    import ray.autoscaler

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    if not schema_path.exists():
        return None
    return json.loads(schema_path.read_text())


def validate_launcher(cfg: Any, *, where: str = "launcher config") -> None:
    """Check a ``ray up`` config: our explicit rules, Ray's JSON schema, then Ray's own validator."""
    _check_launcher_fields(cfg, where)
    schema = ray_launcher_schema()
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validate(cfg, schema)
        except jsonschema.ValidationError as err:
            field = _json_path(err.absolute_path) or "(top level)"
            raise ClusterConfigError(f"{field}: {err.message} (Ray's ray-schema.json)", where=where) from None
    _ray_prepare_and_validate(cfg, where)


def _check_launcher_fields(cfg: Any, where: str) -> None:
    if not isinstance(cfg, dict):
        raise ClusterConfigError("expected a mapping at the top level", where=where)
    name = cfg.get("cluster_name")
    if not isinstance(name, str) or not name.strip():
        raise ClusterConfigError("cluster_name: missing or empty", where=where)
    provider = _mapping(cfg, "provider", where)
    if not isinstance(provider.get("type"), str) or not provider["type"]:
        raise ClusterConfigError("provider.type: missing (e.g. aws, gcp, azure, local)", where=where)
    types = _mapping(cfg, "available_node_types", where)
    if not types:
        raise ClusterConfigError("available_node_types: no node type defined", where=where)
    head = cfg.get("head_node_type")
    if head is None:
        raise ClusterConfigError("head_node_type: missing", where=where)
    if head not in types:
        raise ClusterConfigError(
            f"head_node_type: '{head}' is not one of available_node_types ({', '.join(map(str, types))})",
            where=where,
        )
    global_max = cfg.get("max_workers")
    if global_max is not None and not _nonneg_int(global_max):
        raise ClusterConfigError(f"max_workers: expected a non-negative integer, got {global_max!r}", where=where)
    total_min = 0
    for tname, spec in types.items():
        field = f"available_node_types.{tname}"
        if not isinstance(spec, dict):
            raise ClusterConfigError(f"{field}: expected a mapping", where=where)
        if "resources" not in spec:
            raise ClusterConfigError(f"{field}.resources: missing (e.g. {{CPU: 8}})", where=where)
        if not isinstance(spec["resources"], dict):
            raise ClusterConfigError(f"{field}.resources: expected a mapping", where=where)
        for res, amount in spec["resources"].items():
            if not _nonneg_int(amount):
                raise ClusterConfigError(
                    f"{field}.resources.{res}: expected a non-negative integer, got {amount!r}", where=where
                )
        if not isinstance(spec.get("node_config"), dict):
            raise ClusterConfigError(
                f"{field}.node_config: missing (provider-specific, e.g. InstanceType)", where=where
            )
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if not _nonneg_int(lo):
            raise ClusterConfigError(f"{field}.min_workers: expected a non-negative integer, got {lo!r}", where=where)
        if hi is not None:
            if not _nonneg_int(hi):
                raise ClusterConfigError(
                    f"{field}.max_workers: expected a non-negative integer, got {hi!r}", where=where
                )
            if lo > hi:
                raise ClusterConfigError(f"{field}.min_workers: {lo} > max_workers {hi}", where=where)
            if global_max is not None and hi > global_max and tname != head:
                raise ClusterConfigError(
                    f"{field}.max_workers: {hi} exceeds the global max_workers {global_max}", where=where
                )
        if tname != head:
            total_min += lo
    if global_max is not None and total_min > global_max:
        raise ClusterConfigError(
            f"max_workers: {global_max} is smaller than the sum of min_workers of the node types ({total_min})",
            where=where,
        )


def _ray_prepare_and_validate(cfg: dict[str, Any], where: str) -> None:
    """What `ray up` does before launching: merge the provider's defaults.yaml, then validate."""
    import copy
    import logging

    from ray.autoscaler._private import util as ray_util

    logging.getLogger(ray_util.__name__).setLevel(logging.WARNING)
    try:
        prepared = ray_util.prepare_config(copy.deepcopy(cfg))
        ray_util.validate_config(prepared)
    except Exception as err:  # Ray raises ValueError, RuntimeError, jsonschema errors, KeyError...
        msg = getattr(err, "message", None) or str(err) or type(err).__name__
        path = _json_path(getattr(err, "absolute_path", ()))
        raise ClusterConfigError(
            f"{path + ': ' if path else ''}{msg.splitlines()[0]} (Ray's validate_config)", where=where
        ) from None


# ------------------------------------------------------------------------------------------- KubeRay


def validate_kuberay(doc: Any, *, where: str = "manifest") -> None:
    """Check a ``ray.io/v1`` RayCluster, RayJob or RayService manifest."""
    if not isinstance(doc, dict):
        raise ClusterConfigError("expected a mapping at the top level", where=where)
    if doc.get("apiVersion") != KUBERAY_API_VERSION:
        raise ClusterConfigError(
            f"apiVersion: expected '{KUBERAY_API_VERSION}', got {doc.get('apiVersion')!r}", where=where
        )
    kind = doc.get("kind")
    if kind not in KUBERAY_KINDS:
        raise ClusterConfigError(f"kind: expected one of {', '.join(KUBERAY_KINDS)}, got {kind!r}", where=where)
    meta = _mapping(doc, "metadata", where)
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
        raise ClusterConfigError(
            f"metadata.name: {name!r} is not a DNS-1123 label (lower case, digits, '-')", where=where
        )
    spec = _mapping(doc, "spec", where)
    if kind == "RayCluster":
        _check_cluster_spec(spec, "spec", where)
    elif kind == "RayJob":
        _check_rayjob(spec, where)
    else:
        _check_rayservice(spec, where)


def _check_rayjob(spec: dict[str, Any], where: str) -> None:
    entry = spec.get("entrypoint")
    if not isinstance(entry, str) or not entry.strip():
        raise ClusterConfigError("spec.entrypoint: missing or empty (the command the job runs)", where=where)
    if "runtimeEnvYAML" in spec:
        env = _parse_embedded_yaml(spec["runtimeEnvYAML"], "spec.runtimeEnvYAML", where)
        if not isinstance(env, dict):
            raise ClusterConfigError("spec.runtimeEnvYAML: expected a YAML mapping", where=where)
    for flag in ("shutdownAfterJobFinishes", "suspend"):
        if flag in spec and not isinstance(spec[flag], bool):
            raise ClusterConfigError(f"spec.{flag}: expected true/false, got {spec[flag]!r}", where=where)
    if "rayClusterSpec" in spec:
        _check_cluster_spec(_mapping(spec, "rayClusterSpec", where, "spec."), "spec.rayClusterSpec", where)
    elif not spec.get("clusterSelector"):
        raise ClusterConfigError(
            "spec.rayClusterSpec: missing (or give spec.clusterSelector of an existing cluster)", where=where
        )


def _check_rayservice(spec: dict[str, Any], where: str) -> None:
    if "serveConfigV2" not in spec:
        raise ClusterConfigError("spec.serveConfigV2: missing (the Serve multi-application config)", where=where)
    validate_serve_config(
        _parse_embedded_yaml(spec["serveConfigV2"], "spec.serveConfigV2", where),
        where=f"{where}: spec.serveConfigV2",
    )
    _check_cluster_spec(_mapping(spec, "rayClusterConfig", where, "spec."), "spec.rayClusterConfig", where)


def validate_serve_config(cfg: Any, *, where: str = "serve config") -> None:
    """A Serve multi-application config (``serve run``/``serve deploy``/``serveConfigV2``)."""
    if not isinstance(cfg, dict):
        raise ClusterConfigError("expected a YAML mapping", where=where)
    apps = cfg.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ClusterConfigError("applications: missing or empty", where=where)
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ClusterConfigError(f"applications[{i}]: expected a mapping", where=where)
        path = app.get("import_path")
        if not isinstance(path, str) or not _IMPORT_PATH.match(path):
            raise ClusterConfigError(
                f"applications[{i}].import_path: expected 'module.sub:attr', got {path!r}", where=where
            )
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as err:  # pydantic ValidationError (v1 or v2 flavour)
        first = str(err).splitlines()
        raise ClusterConfigError(f"{' '.join(first[:3])} (Ray Serve's ServeDeploySchema)", where=where) from None


def _check_cluster_spec(spec: dict[str, Any], field: str, where: str) -> None:
    head = _mapping(spec, "headGroupSpec", where, f"{field}.")
    _check_ray_start_params(head, f"{field}.headGroupSpec", where, required=True)
    _check_pod_template(head, f"{field}.headGroupSpec", where)
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        raise ClusterConfigError(f"{field}.workerGroupSpecs: expected a list", where=where)
    seen: set[str] = set()
    for i, group in enumerate(groups):
        gfield = f"{field}.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            raise ClusterConfigError(f"{gfield}: expected a mapping", where=where)
        gname = group.get("groupName")
        if not isinstance(gname, str) or not gname:
            raise ClusterConfigError(f"{gfield}.groupName: missing", where=where)
        if gname in seen:
            raise ClusterConfigError(f"{gfield}.groupName: '{gname}' used twice", where=where)
        seen.add(gname)
        counts = {}
        for key in ("replicas", "minReplicas", "maxReplicas"):
            if key not in group:
                raise ClusterConfigError(f"{gfield}.{key}: missing", where=where)
            if not _nonneg_int(group[key]):
                raise ClusterConfigError(
                    f"{gfield}.{key}: expected a non-negative integer, got {group[key]!r}", where=where
                )
            counts[key] = group[key]
        if not counts["minReplicas"] <= counts["maxReplicas"]:
            raise ClusterConfigError(
                f"{gfield}.minReplicas: {counts['minReplicas']} > maxReplicas {counts['maxReplicas']}",
                where=where,
            )
        if not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            raise ClusterConfigError(
                f"{gfield}.replicas: {counts['replicas']} outside [minReplicas {counts['minReplicas']}, "
                f"maxReplicas {counts['maxReplicas']}]",
                where=where,
            )
        _check_ray_start_params(group, gfield, where, required=False)
        _check_pod_template(group, gfield, where)


def _check_ray_start_params(group: dict[str, Any], field: str, where: str, *, required: bool) -> None:
    if "rayStartParams" not in group:
        if required:
            raise ClusterConfigError(f"{field}.rayStartParams: missing (use {{}} for KubeRay's defaults)", where=where)
        return
    params = group["rayStartParams"]
    if not isinstance(params, dict):
        raise ClusterConfigError(f"{field}.rayStartParams: expected a mapping", where=where)
    for key, value in params.items():
        # The CRD types it map[string]string: the API server rejects `num-cpus: 0` (an integer).
        if not isinstance(value, str):
            raise ClusterConfigError(
                f"{field}.rayStartParams.{key}: values must be strings, got {value!r}", where=where
            )


def _check_pod_template(group: dict[str, Any], field: str, where: str) -> None:
    template = _mapping(group, "template", where, f"{field}.")
    pod = _mapping(template, "spec", where, f"{field}.template.")
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ClusterConfigError(f"{field}.template.spec.containers: missing or empty", where=where)
    for j, container in enumerate(containers):
        cfield = f"{field}.template.spec.containers[{j}]"
        if not isinstance(container, dict):
            raise ClusterConfigError(f"{cfield}: expected a mapping", where=where)
        if not isinstance(container.get("name"), str) or not container["name"]:
            raise ClusterConfigError(f"{cfield}.name: missing", where=where)
        if not isinstance(container.get("image"), str) or not container["image"]:
            raise ClusterConfigError(f"{cfield}.image: missing", where=where)


# ------------------------------------------------------------------------------------------- helpers


def _mapping(doc: dict[str, Any], key: str, where: str, prefix: str = "") -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ClusterConfigError(f"{prefix}{key}: {'missing' if value is None else 'expected a mapping'}", where=where)
    return value


def _parse_embedded_yaml(text: Any, field: str, where: str) -> Any:
    if not isinstance(text, str):
        raise ClusterConfigError(f"{field}: expected a YAML string (use `|`)", where=where)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{field}: not valid YAML: {str(err).splitlines()[0]}", where=where) from None


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m lambo_ray.cluster_validation FILE.yaml...", file=sys.stderr)
        return 2
    status = 0
    for p in paths:
        try:
            print(f"{p}: ok ({', '.join(validate_file(p))})")
        except LamboInputError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
