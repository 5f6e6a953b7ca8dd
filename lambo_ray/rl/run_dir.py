"""The run directory of a pretraining run, which is also its checkpoint::

    out/policy/        the policy in its own format (:func:`lambo_ray.policy.checkpoint.save_policy`): what
                       `lambo solve --method lambo --checkpoint out`, `lambo finetune` and Serve load; no
                       RLlib needed
    out/rllib/         the RLlib Algorithm (learner, optimizer, env-runner connector state) plus
                       ``lambo_state.json``: the run state it belongs to (the source of truth on resume)
    out/state.json     a copy of that run state (iteration, config, metrics history) for people and tools
    out/tb/            TensorBoard scalars
    out/val_labels.json  exact-expert objectives of the validation set (computed once, cached)

Saving is crash-safe: ``rllib/`` is written complete into a temporary sibling and swapped in with
:func:`lambo_ray.mec.io.swap_in_dir` (the old one is put back if the swap fails, and
:func:`resolve_checkpoint` finds it if the process dies between the two renames); ``policy/`` is
swapped the same way by ``save_policy``, and ``state.json`` is replaced last. A crash can only leave
``policy/`` one iteration behind ``rllib/``, and the next save rewrites it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.io import recover_dir
from lambo_ray.rl.config import ARCHITECTURE_FIELDS, PretrainConfig

STATE_FORMAT = "lambo.pretrain/1"
STATE_FILE, RLLIB_STATE_FILE, POLICY_DIR, RLLIB_DIR = "state.json", "lambo_state.json", "policy", "rllib"
TB_DIR, LABELS_FILE = "tb", "val_labels.json"


def read_state(run: Path) -> tuple[Path, dict[str, Any]]:
    """The RLlib checkpoint of a run directory and the run state stored in it; LamboInputError when it is
    missing, incomplete or not ours."""
    run = Path(run)
    rllib = resolve_checkpoint(run)
    if rllib is None:
        raise LamboInputError(f"no checkpoint: {RLLIB_DIR}/ is missing", where=str(run))
    state_file = rllib / RLLIB_STATE_FILE
    if not state_file.exists():
        raise LamboInputError(f"incomplete checkpoint: {RLLIB_DIR}/{RLLIB_STATE_FILE} is missing", where=str(run))
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise LamboInputError(f"unreadable {state_file.name}: {err}", where=str(rllib)) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LamboInputError(f"{state_file.name} is not a {STATE_FORMAT} document", where=str(rllib))
    for key in ("iteration", "config", "history"):
        if key not in state:
            raise LamboInputError(f"{state_file.name} lacks {key!r}", where=str(rllib))
    return rllib, state


def check_compatible(saved: dict[str, Any], cfg: PretrainConfig, where: Path) -> None:
    """A checkpoint resumes only into the same architecture (scale, critic heads, padding)."""
    now = cfg.to_dict()
    diffs = [
        f"{k}: checkpoint has {saved.get(k)!r}, requested {now[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if saved.get(k) != now[k]
    ]
    if diffs:
        raise LamboInputError(
            "checkpoint does not match the requested run (" + "; ".join(diffs) + ")", where=str(where)
        )


def resolve_checkpoint(run: Path) -> Path | None:
    """``run/rllib`` (put back first if a save died between the two renames of its swap), or None."""
    rllib = recover_dir(Path(run) / RLLIB_DIR)
    return rllib if rllib.exists() else None


def check_run_dir(out: Path, cfg: PretrainConfig, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """Cheap checks before anything starts: an existing checkpoint needs ``resume`` and a matching
    architecture; returns (rllib checkpoint dir, run state) to resume from, or (None, None)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LamboInputError(f"{out} exists and is not a directory", where="out")
    if resolve_checkpoint(out) is None:
        if resume and (out / STATE_FILE).exists():
            raise LamboInputError(
                f"incomplete checkpoint: {STATE_FILE} present but {RLLIB_DIR}/ missing", where=str(out)
            )
        return None, None
    if not resume:
        raise LamboInputError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out",
            where="out",
        )
    rllib, state = read_state(out)
    check_compatible(state["config"], cfg, rllib)
    return rllib, state
