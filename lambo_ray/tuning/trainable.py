"""The Tune trial: one :class:`~lambo_ray.rl.pretrain.Pretrainer` built from the trial's config,
reporting after every RLlib iteration, checkpointing through Tune so that ASHA stops, crashes and
`lambo tune --resume` continue from the last checkpoint instead of starting over.

Why a function trainable around ``Pretrainer`` rather than RLlib's Algorithm as a Tune trainable: the
trial then reports exactly what ``lambo pretrain`` logs (the validation gap to the exact expert per
prompt, computed by the one validation routine), and its checkpoints are ``lambo pretrain``
checkpoints (``checkpoint/policy`` loads in ``lambo solve --method lambo`` and Serve).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError

GAP_METRIC = "val/gap"
TRIAL_ROOT = "lambo-tune-trials"  # Pretrainer run directories: <tmp>/lambo-tune-trials/<trial id>


def pretrain_config_from_trial(trial: dict[str, Any]) -> Any:
    """A trial config (PretrainConfig fields plus PolicyConfig fields at the top level) -> PretrainConfig.

    PolicyConfig fields (``d_model``, ``n_heads``, ``enc_layers``...) are merged into
    ``policy_overrides`` so architecture and training hyperparameters share one flat search space.
    """
    from lambo_ray.rl.config import PretrainConfig
    from lambo_ray.tuning.spec import setting_keys

    pretrain_keys, policy_keys = setting_keys()
    values: dict[str, Any] = {}
    overrides = dict(trial.get("policy_overrides") or {})
    for key, value in trial.items():
        if key == "policy_overrides":
            continue
        if key in pretrain_keys:
            values[key] = value
        elif key in policy_keys:
            overrides[key] = value
        else:
            raise LamboInputError(f"{key}: not a PretrainConfig or PolicyConfig field", where="trial config")
    values["policy_overrides"] = overrides
    values["eval_every"] = 1  # every report carries the validation metric ASHA ranks on
    return PretrainConfig.from_dict(values)


def tune_metrics(metrics: dict[str, Any], prompts: tuple[str, ...]) -> dict[str, Any]:
    """Pretrainer metrics plus ``val/gap``: the mean over prompts of the mean gap to the exact expert.

    A prompt whose validation decisions were all infeasible has no gap (NaN); the aggregate is then
    +inf so that such a trial ranks last under ``mode: min`` instead of poisoning comparisons.
    """
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    gaps = [metrics.get(f"val/{p}/gap") for p in prompts]
    if all(g is not None for g in gaps):
        out[GAP_METRIC] = math.inf if any(not math.isfinite(float(g)) for g in gaps) else float(sum(gaps) / len(gaps))
    return out


def pretrain_trial(
    config: dict[str, Any],
    *,
    metric: str,
    checkpoint_every: int = 1,
    val_labels: str | None = None,
    learners_by_scale: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Tune function trainable. ``val_labels``: the text of a Pretrainer validation-label cache
    computed once by the driver, so trials do not each re-solve the validation set exactly.
    ``learners_by_scale``: the learner settings the spec's resources reserved for the trial's scale
    (they must match the placement group the trial got, so they override the trial config).

    The Pretrainer's run directory is the trial's local working copy; each Tune checkpoint is a copy of its
    checkpoint files (``rllib/``, ``policy/``, ``state.json``), i.e. a `lambo pretrain` run directory
    that ``lambo solve --checkpoint``, ``lambo finetune`` and Serve load as they are.
    """
    import torch
    from ray import tune

    from lambo_ray.rl.pretrain import LABELS_FILE, Pretrainer

    if learners_by_scale:
        scale = str(config.get("scale", "S"))
        config = {**config, **learners_by_scale.get(scale, learners_by_scale.get("*", {}))}
    cfg = pretrain_config_from_trial(config)
    torch.set_num_threads(cfg.driver_threads)
    # The run directory lives outside the trial directory: Tune uploads trial directories to storage
    # while trials run, and a checkpoint being rewritten there would race with that upload.
    trial_id = tune.get_context().get_trial_id()
    out = run_dir_root() / trial_id
    _clear_run_dir(out)  # only Tune's checkpoint says where this trial stands
    if val_labels is not None:
        (out / LABELS_FILE).write_text(val_labels)  # ValidationSet.build checks its key and recomputes if stale

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _copy_checkpoint(Path(ckpt_dir), out)
    trainer = Pretrainer(cfg, out, resume=checkpoint is not None, progress=False)
    closed = False
    try:
        if trainer.iteration == 0:
            trainer.warm_start()
        while trainer.iteration < cfg.iterations:
            metrics = tune_metrics(trainer.train_iteration(), cfg.prompts)
            if metric not in metrics:
                raise LamboInputError(
                    f"metric {metric!r} is not reported; available: {', '.join(sorted(metrics))}",
                    where="tune config",
                )
            last = trainer.iteration == cfg.iterations
            if not (last or trainer.iteration % checkpoint_every == 0):
                tune.report(metrics)
                continue
            trainer.save()
            snapshot = Path(tempfile.mkdtemp(prefix=f"{trial_id}.ckpt-", dir=out.parent))
            _copy_checkpoint(out, snapshot, link=True)
            if last:  # Tune may end the process as soon as it sees the final result: clean up first
                trainer.close()
                closed = True
                shutil.rmtree(out, ignore_errors=True)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(snapshot)))
            # Removed only after report() returns: when Tune stops the trial (ASHA, Ctrl+C) report()
            # raises while Tune's uploader thread may still be copying this directory.
            shutil.rmtree(snapshot, ignore_errors=True)
    finally:
        if not closed:
            trainer.close()


def run_dir_root() -> Path:
    """Where trials keep their Pretrainer run directories on a node: ``<tmp>/lambo-tune-trials``."""
    return Path(tempfile.gettempdir()) / TRIAL_ROOT


def remove_run_dirs(trial_ids: Iterable[str]) -> int:
    """Remove what trials with these ids left on this node (a trial that ASHA or Ctrl+C stops between
    two iterations is ended without running its clean-up); returns how many entries were removed."""
    root = run_dir_root()
    removed = 0
    for tid in set(trial_ids):
        for path in root.glob(f"{tid}*"):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _checkpoint_entries() -> tuple[str, ...]:
    from lambo_ray.rl.run_dir import POLICY_DIR, RLLIB_DIR, STATE_FILE

    return (RLLIB_DIR, POLICY_DIR, STATE_FILE)


def _clear_run_dir(out: Path) -> None:
    """Remove a previous attempt's files (a checkpoint there would make Pretrainer refuse to start)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _copy_checkpoint(src: Path, dst: Path, *, link: bool = False) -> None:
    """Copy a run directory's checkpoint files. ``link``: hard links where possible -- Pretrainer.save
    replaces files by rename, never in place, so a linked snapshot stays what it was."""

    def copy(a: str, b: str) -> None:
        try:
            if link:
                os.link(a, b)
                return
        except OSError:
            pass
        shutil.copy2(a, b)

    dst.mkdir(parents=True, exist_ok=True)
    for name in _checkpoint_entries():
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, copy_function=copy)
        elif (src / name).exists():
            copy(str(src / name), str(dst / name))
