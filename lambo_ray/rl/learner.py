"""ACRL loss: PPO-clipped actor-critic with a two-headed critic and an entropy bonus on both heads.

The reward of an instance splits exactly as r = r_off + r_alloc (:mod:`lambo_ray.rl.env`), and the
log-probability of a decision as log pi = log pi_target + log pi_share (the product over UEs of the
target choice and, when offloaded, the share). Credit assignment follows that split:

    A_off   = r_off   - V_off(s)     critic head 0 (offloading); baselines the targets' log-prob
    A_alloc = r_alloc - V_alloc(s)   critic head 1 (allocation); part of the shares' credit A_s

    L = - 1/N sum_i [min(A_off rho_t,i, A_off clip(rho_t,i)) + min(A_s rho_s,i, A_s clip(rho_s,i))]
        + c_v [(V_off - r_off)^2 + (V_alloc - r_alloc)^2]
        - beta_t H_target - beta_s H_share

with A_s the share credit (below), rho_t,i and rho_s,i the new/old probability ratios of UE i's target
and share (``ratio="per_ue"``, the default, as token-level PPO does for sequences), H the per-UE mean
entropies. Clipping the *joint* ratio of a 50-UE decision (``ratio="joint"``) clipped 50-80% of the
rows at N = 50 after one epoch, and clipped rows carry no gradient. With gamma = 0 (independent instances) the value
targets are the immediate reward parts, so no GAE is needed; the advantages are computed once per training batch with
the pre-update critic (as PPO does) by :class:`OneStepAdvantages`, which replaces RLlib's GAE piece.
Dropping the cross terms (r_alloc's effect on the target head and vice versa) trades a small bias for
lower variance; the ``critic="single_head"`` ablation is the plain PPO: one value of r and one
advantage for every log-probability term.

Share credit. Decoding is autoregressive: a UE's share also fixes how much of its server is left for
the UEs after it, and a server that fills up masks later UEs out of it. That consequence shows up in
r_off (the later *targets*), never in r_alloc (r_alloc only compares shares for fixed targets, and the
output mapping rescales every server to full load, so the scale of the claims cannot matter to it).
With A_alloc alone (``share_credit="alloc"``) the share head therefore never learns to claim little,
and for ``min_energy`` (r_alloc = 0 for feasible decisions) it learns nothing at all: at N = 50 the
policy kept offloading ~46% of UEs against the expert's ~96%. The default ``share_credit="total"``
baselines the share log-probs with A_off + A_alloc (the whole reward's advantage), and the target
log-probs with A_off.

Group baseline (``baseline="group"``, POMO / GRPO style). The env decides each instance G times in a
row and tags the steps with the instance's ``group_id``; the baseline of a reward part is then the mean
of that part over the instance's G rollouts in the batch instead of the critic's value:

    A_off = r_off - mean_group(r_off)      A_alloc = r_alloc - mean_group(r_alloc)

standardised over the batch (not per group: a near-deterministic policy gives groups of almost equal
rewards, and dividing by their tiny spread would turn rounding noise into full-size advantages). Rows
whose group has no other member in the batch get advantage 0 (counted as ``group_singletons``). The
critic keeps training on the same targets, so both baselines shape the shared encoder alike and differ
only in the advantage.

Settings come from ``config.learners(learner_config_dict=...)``: ``critic`` ("two_head" |
"single_head"), ``ratio`` ("per_ue" | "joint"), ``share_credit`` ("total" | "alloc"), ``entropy_bonus``
(bool), ``entropy_coeff_target``, ``entropy_coeff_share`` and ``baseline`` ("critic" | "group").
Mixed precision is the RLModule's (its encoder runs under autocast); fp16's loss scaling is RLlib's
gradient scaler, configured by :func:`lambo_ray.rl.algo_config.build_algo_config`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from lambo_ray.errors import LamboInputError
from lambo_ray.rl.env import INFO_GROUP, INFO_R_ALLOC, INFO_R_OFF

CRITICS = ("two_head", "single_head")
BASELINES = ("critic", "group")
RATIOS = ("per_ue", "joint")
SHARE_CREDITS = ("total", "alloc")
# Train-batch columns written by this module's connector pieces / read by the loss.
R_OFF, R_ALLOC, FEASIBLE, GROUP = INFO_R_OFF, INFO_R_ALLOC, "feasible", INFO_GROUP
OLD_LOGP_TARGET, OLD_LOGP_SHARE = "logp_target", "logp_share"  # exploration outputs (behaviour policy)


def critic_heads(critic: str) -> int:
    if critic not in CRITICS:
        raise LamboInputError(f"unknown critic {critic!r}; expected one of {', '.join(CRITICS)}", where="critic")
    return 2 if critic == "two_head" else 1


class AddRewardParts(ConnectorV2):
    """Learner connector piece: the env's ``info[r_off]``, ``info[r_alloc]``, ``info[feasible]`` of each
    step -> batch columns.

    Runs after RLlib's AddOneTsToEpisodesAndTruncate, so episodes are one (phantom) step longer and
    infos[t + 1] belongs to step t; the phantom row gets a copy of the last info and is masked out of
    the loss anyway.
    """

    def __call__(self, *, rl_module: Any, batch: dict, episodes: list, **kwargs: Any) -> dict:
        for ep in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            infos = ep.get_infos(slice(1, len(ep) + 1))
            for key in (R_OFF, R_ALLOC, FEASIBLE):
                self.add_n_batch_items(batch, key, [float(i.get(key, 0.0)) for i in infos], len(ep), ep)
            groups = np.array([int(i.get(GROUP, 0)) for i in infos], dtype=np.int64)
            self.add_n_batch_items(batch, GROUP, list(groups), len(ep), ep)
        return batch


def _normalise(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardise over the valid rows only (RLlib's GAE also counts the phantom rows), and over the
    rows of *every* learner when K > 1 learners share one batch: per-shard statistics would shift each
    shard's baseline by ~std/sqrt(rows), and K learners would no longer take the step one learner takes
    on the whole batch."""
    valid = x[mask].double()
    sums = torch.stack([torch.tensor(float(valid.numel()), dtype=valid.dtype, device=valid.device), valid.sum()])
    sums = torch.cat([sums, (valid * valid).sum()[None]])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)  # every learner runs this connector once per update, same order
    count, total, squares = sums
    if count < 1:
        return x
    mean = total / count
    if count < 2:
        return x - mean.to(x.dtype)
    std = ((squares - count * mean * mean) / (count - 1)).clamp_min(0.0).sqrt()
    return ((x - mean.to(x.dtype)) / std.clamp_min(1e-6).to(x.dtype)).to(x.dtype)


class OneStepAdvantages(ConnectorV2):
    """Replaces GAE for gamma = 0: value targets are the reward parts, advantages = targets - V_old.

    Writes ``value_targets`` and ``advantages`` as (B, H) tensors, H = critic heads (2: offloading,
    allocation; 1: whole reward), advantages standardised per head over the valid rows. The baseline is
    the critic's value or, with ``baseline="group"``, the group mean (module docstring).
    """

    def __init__(self, *args: Any, baseline: str = "critic", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if baseline not in BASELINES:
            raise LamboInputError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}")
        self.baseline = baseline

    def __call__(self, *, rl_module: Any, batch: dict, episodes: list, metrics: Any = None, **kwargs: Any) -> dict:
        for mid, mbatch in batch.items():
            module = rl_module[mid].unwrapped()  # the DDP wrapper of K > 1 learners hides our methods
            mask = mbatch[Columns.LOSS_MASK].bool()
            values = module.compute_head_values(mbatch)  # (B, H), no grad
            reward = mbatch[Columns.REWARDS].to(values.dtype)
            if values.shape[-1] == 2:
                r_off = mbatch[R_OFF].to(values.dtype)
                targets = torch.stack([r_off, reward - r_off], dim=-1)
            else:
                targets = reward[:, None]
            targets = torch.where(mask[:, None], targets, torch.zeros_like(targets))
            stats = _batch_stats(mbatch, mask)
            if self.baseline == "group":
                base, has_peer = group_means(targets, mbatch[GROUP], mask)
                adv = torch.where(has_peer[:, None], targets - base, torch.zeros_like(targets))
                stats["group_singletons"] = float((mask & ~has_peer).sum())
            else:
                adv = targets - values
            mbatch[Postprocessing.VALUE_TARGETS] = targets
            mbatch[Postprocessing.ADVANTAGES] = torch.stack(
                [_normalise(adv[:, h], mask) for h in range(adv.shape[-1])], dim=-1
            )
            if metrics is not None:
                metrics.log_dict(stats, key=mid, window=1)
        return batch


def group_means(x: torch.Tensor, group: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the mean of ``x`` (B, H) over the valid rows of its group, and whether the group has at
    least one other valid row in the batch."""
    _, inverse = torch.unique(torch.as_tensor(group, device=x.device).long(), return_inverse=True)
    valid = mask.to(x.dtype)
    count = torch.zeros(int(inverse.max()) + 1, dtype=x.dtype, device=x.device).index_add_(0, inverse, valid)
    total = torch.zeros(count.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    total.index_add_(0, inverse, x * valid[:, None])
    mean = total[inverse] / count[inverse].clamp_min(1.0)[:, None]
    return mean, count[inverse] >= 2


def _batch_stats(mbatch: dict, mask: torch.Tensor) -> dict[str, float]:
    """Whole-training-batch reward statistics (the per-instance learning curve), overall and per prompt."""
    from lambo_ray.policy import PROMPT_IDS

    reward = mbatch[Columns.REWARDS][mask].double()
    r_off = mbatch[R_OFF][mask].double()
    out = {
        "batch_reward_mean": float(reward.mean()),
        "batch_r_off_mean": float(r_off.mean()),
        "batch_r_alloc_mean": float((reward - r_off).mean()),
        "batch_feasible": float(mbatch[FEASIBLE][mask].double().mean()),
    }
    prompt = mbatch[Columns.OBS]["prompt"].reshape(-1)[mask]
    for name, pid in PROMPT_IDS.items():
        sel = prompt == pid
        if bool(sel.any()):
            out[f"batch_reward_mean/{name}"] = float(reward[sel].mean())
    return out


def _clipped_surrogate(adv: torch.Tensor, ratio: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.min(adv * ratio, adv * ratio.clamp(1.0 - clip, 1.0 + clip))


class AcrlLearner(PPOTorchLearner):
    """PPOTorchLearner with the ACRL loss (module docstring); keeps PPO's build, schedulers, metrics."""

    def build(self) -> None:
        super().build()
        if float(self.config.gamma) != 0.0:
            raise LamboInputError(
                f"ACRL needs gamma = 0 (independent instances per step), got {self.config.gamma}",
                where="gamma",
            )
        lc = self._acrl_settings()
        critic_heads(lc["critic"])
        if lc["share_credit"] not in SHARE_CREDITS:
            raise LamboInputError(
                f"unknown share_credit {lc['share_credit']!r}; expected one of {', '.join(SHARE_CREDITS)}",
                where="share_credit",
            )
        if lc["ratio"] not in RATIOS:
            raise LamboInputError(f"unknown ratio {lc['ratio']!r}; expected one of {', '.join(RATIOS)}", where="ratio")
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.remove(GeneralAdvantageEstimation)
            self._learner_connector.append(OneStepAdvantages(baseline=lc["baseline"]))

    def _acrl_settings(self) -> dict[str, Any]:
        lc = {
            "critic": "two_head",
            "ratio": "per_ue",
            "share_credit": "total",
            "entropy_bonus": True,
            "entropy_coeff_target": 0.01,
            "entropy_coeff_share": 0.001,
            "baseline": "critic",
        }
        lc.update(self.config.learner_config_dict or {})
        return lc

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict, fwd_out: dict) -> torch.Tensor:
        lc = self._acrl_settings()
        mask = batch[Columns.LOSS_MASK].bool()

        def mmean(x: torch.Tensor) -> torch.Tensor:
            return x[mask].mean()

        clip = config.clip_param
        adv, targets, values = (
            batch[Postprocessing.ADVANTAGES],
            batch[Postprocessing.VALUE_TARGETS],
            fwd_out["vf"],
        )
        ue = fwd_out["ue_mask"].to(values.dtype)  # (B, N) real UEs
        n_real = ue.sum(-1).clamp_min(1.0)
        d_t = (fwd_out["logp_target"] - batch[OLD_LOGP_TARGET]) * ue  # (B, N) per-UE log-ratios
        d_s = (fwd_out["logp_share"] - batch[OLD_LOGP_SHARE]) * ue  # 0 where local: no share was drawn
        a_t = adv[:, 0]
        if lc["critic"] == "single_head":
            a_s = adv[:, 0]
        elif lc["share_credit"] == "total":  # the shares also decide which later targets still fit
            a_s = adv[:, 0] + adv[:, 1]
        else:
            a_s = adv[:, 1]
        metrics: dict[str, Any] = {}
        surr_t, surr_s, clipped = _surrogates(lc, (a_t, a_s), (d_t, d_s), ue, clip)
        surrogate = surr_t + surr_s
        vf_err = (values - targets).pow(2).clamp(0.0, config.vf_clip_param)  # (B, H)
        vf_loss = vf_err.sum(-1)
        entropy_bonus = torch.zeros_like(vf_loss)
        if lc["entropy_bonus"]:
            entropy_bonus = (
                lc["entropy_coeff_target"] * fwd_out["entropy_target"]
                + lc["entropy_coeff_share"] * fwd_out["entropy_share"]
            )
        total = mmean(-surrogate + config.vf_loss_coeff * vf_loss - entropy_bonus)

        log_ratio = (d_t + d_s).sum(-1)
        metrics.update(
            policy_loss=-mmean(surrogate),
            policy_loss_target=-mmean(surr_t),
            policy_loss_share=-mmean(surr_s),
            entropy_target=mmean(fwd_out["entropy_target"]),
            entropy_share=mmean(fwd_out["entropy_share"]),
            approx_kl=mmean(torch.expm1(log_ratio) - log_ratio),  # k3 estimator of KL(old || new), >= 0
            approx_kl_per_ue=mmean(((torch.expm1(d_t + d_s) - (d_t + d_s)) * ue).sum(-1) / n_real),
            clip_fraction=mmean(clipped),
            valid_rows=float(mask.sum()),
            mean_reward=mmean(targets.sum(-1)),
        )
        if lc["critic"] == "two_head":
            metrics.update(
                vf_off_loss=mmean(vf_err[:, 0]),
                vf_alloc_loss=mmean(vf_err[:, 1]),
                mean_r_off=mmean(targets[:, 0]),
                mean_r_alloc=mmean(targets[:, 1]),
            )
        else:
            metrics.update(vf_loss=mmean(vf_err[:, 0]))
        metrics["vf_explained_var"] = _explained_variance(targets.sum(-1)[mask], values.sum(-1)[mask])
        self.metrics.log_dict(
            {k: (v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()},
            key=module_id,
            window=1,
        )
        return total


def _surrogates(
    lc: dict[str, Any],
    advantages: tuple[torch.Tensor, torch.Tensor],
    log_ratios: tuple[torch.Tensor, torch.Tensor],
    ue: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogates of the target and share heads, per row, and the clipped fraction.

    ``advantages``: (B,) per head; ``log_ratios``: (B, N) per UE and head, 0 on padding; ``ue``: (B, N)
    real UEs as floats.
    """
    (a_t, a_s), (d_t, d_s) = advantages, log_ratios
    n_real = ue.sum(-1).clamp_min(1.0)
    if lc["ratio"] == "per_ue":
        # One ratio per decision (as token-level PPO for sequences): the joint ratio of 50 UEs leaves
        # [1 - clip, 1 + clip] after tiny per-UE changes, and clipped rows carry no gradient.
        rho_t, rho_s = torch.exp(d_t), torch.exp(d_s)
        surr_t = (_clipped_surrogate(a_t[:, None], rho_t, clip) * ue).sum(-1) / n_real
        surr_s = (_clipped_surrogate(a_s[:, None], rho_s, clip) * ue).sum(-1) / n_real
        clipped = (((rho_t - 1).abs() > clip) | ((rho_s - 1).abs() > clip)).float().mul(ue).sum(-1) / n_real
        return surr_t, surr_s, clipped
    if lc["critic"] == "two_head":  # "joint": one ratio for the whole decision, per head
        rho_t, rho_s = torch.exp(d_t.sum(-1)), torch.exp(d_s.sum(-1))
        clipped = (((rho_t - 1).abs() > clip) | ((rho_s - 1).abs() > clip)).float()
        return _clipped_surrogate(a_t, rho_t, clip), _clipped_surrogate(a_s, rho_s, clip), clipped
    rho = torch.exp(d_t.sum(-1) + d_s.sum(-1))  # "joint" with one head: one ratio for everything
    return _clipped_surrogate(a_t, rho, clip), torch.zeros_like(a_t), ((rho - 1).abs() > clip).float()


def _explained_variance(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    var = y.var() if y.numel() > 1 else torch.zeros((), dtype=y.dtype)
    if float(var) <= 0:
        return torch.full((), float("nan"))
    return (1.0 - (y - pred).var() / var).detach()


__all__ = ["AcrlLearner", "AddRewardParts", "OneStepAdvantages", "CRITICS", "critic_heads"]
