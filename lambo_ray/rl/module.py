"""RLModule around the plain-torch LAMBO policy, plus the two-headed critic (RLlib new API stack).

The actor *is* :class:`lambo_ray.policy.LamboPolicy`: the RLModule only converts RLlib's observation
dict to a :class:`PolicyBatch`, so checkpoints of ``self.policy`` serve without Ray or RLlib.
Sampling runs the encoder once and the decoder autoregressively over the UEs, batched over the env
runner's sub-envs, and returns the whole decision and its log-probability (``Columns.ACTIONS`` /
``Columns.ACTION_LOGP``; no RLlib distribution class is involved). Training recomputes the
log-probabilities of the stored decisions by teacher forcing in one parallel pass.

The critic is an MLP on the policy's pooled encoding plus its own prompt embedding, with
``critic_heads`` outputs: 2 (head 0 values the offloading decision, r_off; head 1 the resource
allocation, r_alloc) or 1 (the whole reward, the single-head ablation). It shares the encoder with the
actor, and is left out of the env runners' inference-only copies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from lambo_ray.policy import LamboPolicy, PolicyBatch, PolicyConfig
from lambo_ray.policy.model import DecodeOut, Encoded

# Extra per-step model outputs stored by RLlib in the episodes (the behaviour policy's parts).
LOGP_TARGET, LOGP_SHARE, BETA_U = "logp_target", "logp_share", "u"


class Critic(nn.Module):
    """V(s) per head from the pooled encoding and a prompt embedding of its own."""

    def __init__(self, d_model: int, n_prompts: int, heads: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or d_model
        self.prompt = nn.Embedding(n_prompts, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, heads),
        )

    def forward(self, pooled: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([pooled, self.prompt(prompt)], dim=-1))


def module_model_config(policy: PolicyConfig, critic_heads: int = 2) -> dict[str, Any]:
    """The ``model_config`` dict of :class:`LamboRLModule` (RLlib passes model configs as dicts)."""
    return {"policy": policy.to_dict(), "critic_heads": int(critic_heads)}


def _valid_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)


class LamboRLModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    def setup(self) -> None:
        mc = dict(self.model_config or {})
        self.policy_config = PolicyConfig.from_dict(dict(mc.get("policy", {})))
        self.critic_heads = int(mc.get("critic_heads", 2))
        self.policy = LamboPolicy(self.policy_config)
        if not self.inference_only:
            self.critic = Critic(self.policy_config.d_model, self.policy_config.n_prompts, self.critic_heads)

    def get_non_inference_attributes(self) -> list[str]:
        return ["critic"]

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def policy_batch(batch: dict[str, Any]) -> PolicyBatch:
        return PolicyBatch.from_tensor_dict(batch[Columns.OBS])

    def _act(self, batch: dict[str, Any], mode: str) -> dict[str, Any]:
        with torch.no_grad():
            pb = self.policy_batch(batch)
            out: DecodeOut = self.policy.decode(pb, self.policy.encode(pb), mode=mode)
        return {
            Columns.ACTIONS: {"target": out.target, "share": out.share},
            Columns.ACTION_LOGP: out.logp,
            LOGP_TARGET: out.logp_target,  # (B, N): per-UE parts, for per-UE PPO ratios
            LOGP_SHARE: out.logp_share,
            BETA_U: out.u,
        }

    # -- RLModule forward passes --------------------------------------------------------------
    def _forward_exploration(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._act(batch, "sample")

    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._act(batch, "greedy")

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Teacher-forced per-UE log-probs of the stored decisions (target and share parts, (B, N)), per-UE
        mean entropies of both heads (B,), the real-UE mask (B, N) and the critic's values (B, heads)."""
        pb = self.policy_batch(batch)
        enc = self.policy.encode(pb)
        actions = batch[Columns.ACTIONS]
        tf = self.policy.teacher_forced(
            pb, enc, actions["target"].long(), actions["share"].double(), u=batch.get(BETA_U)
        )
        return {
            "logp_target": tf.logp_target,
            "logp_share": tf.logp_share,
            "ue_mask": pb.ue_mask,
            "entropy_target": _valid_mean(tf.entropy_target, pb.ue_mask),
            "entropy_share": _valid_mean(tf.entropy_share, pb.ue_mask),
            "vf": self._values(enc, pb),
        }

    def _values(self, enc: Encoded, pb: PolicyBatch) -> torch.Tensor:
        return self.critic(self.policy.pooled(enc), pb.prompt)

    # -- ValueFunctionAPI ---------------------------------------------------------------------
    def compute_head_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, heads) values without gradient: the pre-update baselines of one training batch."""
        with torch.no_grad():
            pb = self.policy_batch(batch)
            return self._values(self.policy.encode(pb), pb)

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """V(s) = sum of the heads (the value of the whole reward), shape (B,)."""
        return self.compute_head_values(batch).sum(-1)
