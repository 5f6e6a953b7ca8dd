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
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lambo_ray.mec.errors import LamboInputError

GAP_METRIC = "val/gap"
TRIAL_OUT = "pretrain"  # Pretrainer's run directory inside the trial directory


def pretrain_config_from_trial(trial: dict[str, Any]) -> Any:
    """A trial config (PretrainConfig fields plus PolicyConfig fields at the top level) -> PretrainConfig.

    PolicyConfig fields (``d_model``, ``n_heads``, ``enc_layers``...) are merged into
    ``policy_overrides`` so architecture and training hyperparameters share one flat search space.
    """
    from lambo_ray.tuning.spec import setting_keys
    from lambo_ray.rl.pretrain import PretrainConfig

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
        out[GAP_METRIC] = (math.inf if any(not math.isfinite(float(g)) for g in gaps)
                           else float(sum(gaps) / len(gaps)))
    return out


def pretrain_trial(config: dict[str, Any], *, metric: str, checkpoint_every: int = 1,
                   val_labels: str | None = None) -> None:
    """Tune function trainable. ``val_labels``: the text of a Pretrainer validation-label cache
    computed once by the driver, so trials do not each re-solve the validation set exactly."""
    import torch
    from ray import tune

    from lambo_ray.rl.pretrain import CHECKPOINT_DIR, LABELS_FILE, Pretrainer

    cfg = pretrain_config_from_trial(config)
    torch.set_num_threads(cfg.driver_threads)
    out = Path(tune.get_context().get_trial_dir()) / TRIAL_OUT
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old"):
        shutil.rmtree(stale, ignore_errors=True)  # only Tune's checkpoint says where this trial stands
    if val_labels is not None and not (out / LABELS_FILE).exists():
        (out / LABELS_FILE).write_text(val_labels)  # ValidationSet.build checks its key and recomputes if stale

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            shutil.copytree(Path(ckpt_dir) / CHECKPOINT_DIR, out / CHECKPOINT_DIR)
    trainer = Pretrainer(cfg, out, resume=checkpoint is not None, progress=False)
    try:
        if trainer.iteration == 0:
            trainer.warm_start()
        while trainer.iteration < cfg.iterations:
            metrics = tune_metrics(trainer.train_iteration(), cfg.prompts)
            if metric not in metrics:
                raise LamboInputError(f"metric {metric!r} is not reported; available: {', '.join(sorted(metrics))}",
                                      where="tune config")
            due = trainer.iteration % checkpoint_every == 0 or trainer.iteration == cfg.iterations
            if not due:
                tune.report(metrics)
                continue
            with tempfile.TemporaryDirectory(prefix="lambo-ckpt-") as tmp:
                trainer.save(Path(tmp) / CHECKPOINT_DIR)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    finally:
        trainer.close()
