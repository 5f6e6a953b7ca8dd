"""Policy and decoder-only checkpoints: small directories with a JSON manifest and a torch state dict.

Layout::

    <dir>/policy.pt     state dict of the whole policy
    <dir>/policy.json   {"format": "lambo.policy/1", "config": PolicyConfig, "scale": "S"|"M"|"L"|"custom",
                         "feature_version", "fingerprint", "n_params", "meta": {...caller's...}}

    <dir>/decoder.pt    state dict of ``policy.decoder`` only (ALEF fine-tunes only the decoder)
    <dir>/decoder.json  {"format": "lambo.decoder/1", "decoder_id", "base_fingerprint", "config", ...}

The *fingerprint* is a hash of the embedding + encoder weights. A decoder is only meaningful on top of
the encoder it was trained with, so :func:`load_decoder` refuses one whose base fingerprint differs.

Writes are atomic: everything goes to a temporary sibling directory, is fsync'ed, and is renamed into
place; an existing good checkpoint is only moved aside once the new one is complete, and restored if
the final rename fails. Every problem a user can cause (missing or truncated files, wrong scale, a
decoder for another encoder) is a :class:`LamboInputError` naming the directory and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.io import fsync_dir, swap_in_dir
from lambo_ray.policy.config import SCALES, PolicyConfig
from lambo_ray.policy.features import FEATURE_VERSION
from lambo_ray.policy.model import LamboPolicy

POLICY_FORMAT = "lambo.policy/1"
DECODER_FORMAT = "lambo.decoder/1"
POLICY_WEIGHTS, POLICY_MANIFEST = "policy.pt", "policy.json"
DECODER_WEIGHTS, DECODER_MANIFEST = "decoder.pt", "decoder.json"
DECODER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The default LAMBO-S that ships inside the package (with its model card, MODEL_CARD.md).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "lambo-s"


def default_checkpoint() -> Path:
    """The shipped checkpoint every command uses when no ``--checkpoint`` is given."""
    if not (DEFAULT_CHECKPOINT / POLICY_MANIFEST).is_file():
        raise LamboInputError(
            "no --checkpoint given and the default checkpoint is missing from this installation "
            f"(expected {DEFAULT_CHECKPOINT.name}/{POLICY_MANIFEST} inside the lambo_ray package)",
            where="checkpoint",
        )
    return DEFAULT_CHECKPOINT


# ----------------------------------------------------------------------------------------------
# Fingerprints and scale names
# ----------------------------------------------------------------------------------------------
def policy_fingerprint(policy: LamboPolicy) -> str:
    """sha256 (first 16 hex digits) of the embedding + encoder weights: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for prefix, module in (("embedding", policy.embedding), ("encoder", policy.encoder)):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def scale_name(cfg: PolicyConfig) -> str:
    for name, c in SCALES.items():
        if c == cfg:
            return name
    return "custom"


# ----------------------------------------------------------------------------------------------
# Atomic directory writes
# ----------------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_dir(target: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh directory and swap it in place of ``target``."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is read by other users and services
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        fsync_dir(tmp)
        swap_in_dir(tmp, target)  # the good checkpoint is put back if the swap fails
        fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def _json_bytes(doc: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    except TypeError as err:
        raise LamboInputError(f"checkpoint meta is not JSON-serialisable: {err}", where="meta") from None


# ----------------------------------------------------------------------------------------------
# Reading helpers (every failure is a LamboInputError naming the file)
# ----------------------------------------------------------------------------------------------
def _require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise LamboInputError(f"{what} directory does not exist", where=str(path))
    if not path.is_dir():
        raise LamboInputError(f"{what} path is not a directory", where=str(path))
    return path


def _read_json(path: Path, fmt: str) -> dict[str, Any]:
    if not path.is_file():
        raise LamboInputError(f"missing {path.name}", where=str(path.parent))
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LamboInputError(f"corrupt manifest ({err})", where=str(path)) from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise LamboInputError(f"not a {fmt} manifest (format {got!r})", where=str(path))
    if doc.get("feature_version") != FEATURE_VERSION:
        raise LamboInputError(
            f"written for feature version {doc.get('feature_version')}, this code uses {FEATURE_VERSION}",
            where=str(path),
        )
    return doc


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LamboInputError(f"missing {path.name}", where=str(path.parent))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... on damaged files
        raise LamboInputError(
            f"corrupt weights file ({type(err).__name__}: {str(err)[:120]})", where=str(path)
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LamboInputError("weights file does not hold a state dict", where=str(path))
    return state


def _config(doc: dict[str, Any], where: Path) -> PolicyConfig:
    raw = doc.get("config")
    if not isinstance(raw, dict):
        raise LamboInputError("manifest has no 'config' object", where=str(where))
    try:
        return PolicyConfig.from_dict(raw)
    except (LamboInputError, TypeError) as err:
        raise LamboInputError(f"bad policy config: {err}", where=str(where)) from None


def _check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Keys and shapes must match exactly; checked *before* loading so a mismatch never half-loads."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s) e.g. {extra[0]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[0]}")
        raise LamboInputError("weights do not match the config: " + "; ".join(parts), where=str(where))


# ----------------------------------------------------------------------------------------------
# Whole policy
# ----------------------------------------------------------------------------------------------
def save_policy(
    directory: str | os.PathLike[str],
    policy: LamboPolicy,
    meta: dict[str, Any] | None = None,
    scale: str | None = None,
) -> str:
    """Write a full checkpoint; returns its fingerprint."""
    fp = policy_fingerprint(policy)
    doc = {
        "format": POLICY_FORMAT,
        "config": policy.cfg.to_dict(),
        "scale": scale or scale_name(policy.cfg),
        "feature_version": FEATURE_VERSION,
        "fingerprint": fp,
        "n_params": sum(p.numel() for p in policy.parameters()),
        "meta": meta or {},
    }
    _atomic_dir(
        Path(directory),
        {POLICY_WEIGHTS: _state_bytes(policy.state_dict()), POLICY_MANIFEST: _json_bytes(doc)},
    )
    return fp


def resolve_policy_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it holds policy.json, else ``path/policy`` (the layout of a training run's
    output directory, e.g. ``lambo pretrain --out RUN``)."""
    path = _require_dir(Path(path), "policy checkpoint")
    for cand in (path, path / "policy"):
        if (cand / POLICY_MANIFEST).is_file():
            return cand
    raise LamboInputError(
        f"no policy checkpoint here (expected {POLICY_MANIFEST} in DIR or DIR/policy)", where=str(path)
    )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The policy.json of a checkpoint (validated), without loading weights."""
    d = _require_dir(Path(directory), "policy checkpoint")
    return _read_json(d / POLICY_MANIFEST, POLICY_FORMAT)


def load_policy(
    directory: str | os.PathLike[str],
    expected_scale: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[LamboPolicy, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_policy`; returns (policy in eval mode, caller's meta)."""
    d = _require_dir(Path(directory), "policy checkpoint")
    doc = _read_json(d / POLICY_MANIFEST, POLICY_FORMAT)
    if expected_scale is not None and doc.get("scale") != expected_scale:
        raise LamboInputError(f"checkpoint is scale {doc.get('scale')!r}, expected {expected_scale!r}", where=str(d))
    cfg = _config(doc, d / POLICY_MANIFEST)
    state = _read_state(d / POLICY_WEIGHTS)
    policy = LamboPolicy(cfg)
    _check_state(policy, state, d / POLICY_WEIGHTS)
    policy.load_state_dict(state)
    fp = policy_fingerprint(policy)
    if doc.get("fingerprint") != fp:
        raise LamboInputError(
            f"weights fingerprint {fp} differs from the manifest's {doc.get('fingerprint')!r} "
            "(files from different saves?)",
            where=str(d),
        )
    return policy.to(device).eval(), dict(doc.get("meta") or {})


# ----------------------------------------------------------------------------------------------
# Decoder only
# ----------------------------------------------------------------------------------------------
def save_decoder(
    directory: str | os.PathLike[str],
    policy: LamboPolicy,
    decoder_id: str,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write only ``policy.decoder``'s weights, tied to the encoder by its fingerprint."""
    if not isinstance(decoder_id, str) or not DECODER_ID_RE.match(decoder_id):
        raise LamboInputError(f"decoder id {decoder_id!r} must match {DECODER_ID_RE.pattern}", where="decoder_id")
    doc = {
        "format": DECODER_FORMAT,
        "decoder_id": decoder_id,
        "base_fingerprint": policy_fingerprint(policy),
        "config": policy.cfg.to_dict(),
        "feature_version": FEATURE_VERSION,
        "meta": meta or {},
    }
    _atomic_dir(
        Path(directory),
        {DECODER_WEIGHTS: _state_bytes(policy.decoder.state_dict()), DECODER_MANIFEST: _json_bytes(doc)},
    )


def read_decoder(
    directory: str | os.PathLike[str],
    base_fingerprint: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(decoder state dict, manifest) of a decoder checkpoint, checked against ``base_fingerprint``.

    Serve uses this to hold several decoders for one encoder without copying the encoder.
    """
    d = _require_dir(Path(directory), "decoder checkpoint")
    doc = _read_json(d / DECODER_MANIFEST, DECODER_FORMAT)
    if base_fingerprint is not None and doc.get("base_fingerprint") != base_fingerprint:
        raise LamboInputError(
            f"decoder {doc.get('decoder_id')!r} was trained on encoder {doc.get('base_fingerprint')!r}, "
            f"but the loaded policy's encoder is {base_fingerprint!r}",
            where=str(d),
        )
    return _read_state(d / DECODER_WEIGHTS), doc


def load_decoder(policy: LamboPolicy, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a decoder checkpoint into ``policy.decoder`` (in place); returns its manifest."""
    d = Path(directory)
    state, doc = read_decoder(d, policy_fingerprint(policy))
    cfg = _config(doc, d / DECODER_MANIFEST)
    if cfg != policy.cfg:
        raise LamboInputError(f"decoder config {cfg} differs from the policy's {policy.cfg}", where=str(d))
    _check_state(policy.decoder, state, d / DECODER_WEIGHTS)
    policy.decoder.load_state_dict(state)
    return doc
