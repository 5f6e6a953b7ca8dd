"""RLModule around the plain-torch LAMBO policy, plus the two-headed critic (RLlib new API stack).

The actor *is* :class:`lambo_ray.policy.LamboPolicy`: the RLModule only converts RLlib's observation
dict to a :class:`PolicyBatch`, so checkpoints of ``self.policy`` serve without Ray or RLlib.
Sampling runs the encoder once and the decoder autoregressively over the UEs, batched over the env
runner's sub-envs, and returns the whole decision and its log-probability (``Columns.ACTIONS`` /
``Columns.ACTION_LOGP``; no RLlib distribution class is involved). Training recomputes the
log-probabilities of the stored decisions by teacher forcing in one parallel pass.

Cells of a scenario distribution vary from 10 to 200 UEs while observations are padded to the largest;
every forward pass therefore runs size-sorted chunks of ``chunk_rows`` rows, each cut to its own largest
real cell (:mod:`lambo_ray.rl.trim`; ``trim_padding=False`` restores the padded computation, for
comparison).

Mixed precision (``precision`` "bf16" / "fp16", training only): the encoder, where nearly all the
arithmetic is (attention over N + M tokens with a per-pair bias), runs under ``torch.autocast``; its
outputs are cast back to float32 and the decoder, the heads and the log-probabilities stay in float32.
Under autocast everywhere, bf16 log-probabilities (8-bit mantissa) made the PPO ratios of an unchanged
policy differ from 1 by about 1e-3 and the share entropy by 7%.

The critic is an MLP on the policy's pooled encoding plus its own prompt embedding, with
``critic_heads`` outputs: 2 (head 0 values the offloading decision, r_off; head 1 the resource
allocation, r_alloc) or 1 (the whole reward, the single-head ablation). It shares the encoder with the
actor, and is left out of the env runners' inference-only copies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from lambo_ray.errors import LamboInputError
from lambo_ray.policy import LamboPolicy, PolicyBatch, PolicyConfig
from lambo_ray.policy.model import DecodeOut, Encoded
from lambo_ray.rl.trim import run_chunked

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


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def module_model_config(
    policy: PolicyConfig,
    critic_heads: int = 2,
    trim_padding: bool = True,
    chunk_rows: int = 16,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The ``model_config`` dict of :class:`LamboRLModule` (RLlib passes model configs as dicts).
    ``trim_padding`` and ``chunk_rows`` change the cost of a forward pass, never its result;
    ``precision`` is the encoder's in training (module docstring)."""
    if precision not in PRECISIONS:
        raise LamboInputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return {
        "policy": policy.to_dict(),
        "critic_heads": int(critic_heads),
        "trim_padding": bool(trim_padding),
        "chunk_rows": int(chunk_rows),
        "precision": precision,
    }


def _valid_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)


class LamboRLModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    def setup(self) -> None:
        mc = dict(self.model_config or {})
        self.policy_config = PolicyConfig.from_dict(dict(mc.get("policy", {})))
        self.critic_heads = int(mc.get("critic_heads", 2))
        self.trim_padding = bool(mc.get("trim_padding", True))
        self.chunk_rows = int(mc.get("chunk_rows", 16))
        self.train_dtype = PRECISIONS[str(mc.get("precision", "fp32"))]
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
        """Decode the batch in size chunks; per-UE outputs come back padded to the action shape."""

        def chunk(sub: PolicyBatch, _: torch.Tensor) -> dict[str, torch.Tensor]:
            out: DecodeOut = self.policy.decode(sub, self.policy.encode(sub), mode=mode)
            return {
                "target": out.target,
                "share": out.share,
                "logp": out.logp,
                "logp_target": out.logp_target,
                "logp_share": out.logp_share,
                "u": out.u,
            }

        with torch.no_grad():
            out = run_chunked(self.policy_batch(batch), self.chunk_rows, self.trim_padding, chunk)
        return {
            Columns.ACTIONS: {"target": out["target"], "share": out["share"]},
            Columns.ACTION_LOGP: out["logp"],
            LOGP_TARGET: out["logp_target"],  # (B, N): per-UE parts, for per-UE PPO ratios
            LOGP_SHARE: out["logp_share"],
            BETA_U: out["u"],
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
        actions = batch[Columns.ACTIONS]
        target, share, u = actions["target"].long(), actions["share"].double(), batch.get(BETA_U)
        # RLlib's bootstrap row (masked out of the loss) pairs the episode's last observation with a copy
        # of the previous step's action, which belongs to another cell and may name a server this one
        # lacks: send such targets local, so a chunk cut to its own servers can still index them.
        target = torch.where(target <= pb.server_mask.sum(1, keepdim=True), target, 0)

        def chunk(sub: PolicyBatch, idx: torch.Tensor) -> dict[str, torch.Tensor]:
            n = sub.n_max
            enc = self._encode_for_training(sub)
            tf = self.policy.teacher_forced(
                sub, enc, target[idx, :n], share[idx, :n], u=None if u is None else u[idx, :n]
            )
            return {
                "logp_target": tf.logp_target,
                "logp_share": tf.logp_share,
                "entropy_target": _valid_mean(tf.entropy_target, sub.ue_mask),
                "entropy_share": _valid_mean(tf.entropy_share, sub.ue_mask),
                "vf": self._values(enc, sub),
            }

        out = run_chunked(pb, self.chunk_rows, self.trim_padding, chunk)
        out["ue_mask"] = pb.ue_mask
        return out

    def _encode_for_training(self, pb: PolicyBatch) -> Encoded:
        """The encoder under autocast when training in bf16/fp16, its outputs back in float32."""
        if self.train_dtype is None:
            return self.policy.encode(pb)
        with torch.autocast(device_type=pb.ue.device.type, dtype=self.train_dtype):
            enc = self.policy.encode(pb)
        low = (torch.bfloat16, torch.float16)
        return dataclasses.replace(
            enc,
            **{
                f.name: getattr(enc, f.name).float()
                for f in dataclasses.fields(enc)
                if torch.is_tensor(getattr(enc, f.name)) and getattr(enc, f.name).dtype in low
            },
        )

    def _values(self, enc: Encoded, pb: PolicyBatch) -> torch.Tensor:
        return self.critic(self.policy.pooled(enc), pb.prompt)

    # -- ValueFunctionAPI ---------------------------------------------------------------------
    def compute_head_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, heads) values without gradient: the pre-update baselines of one training batch."""
        with torch.no_grad():
            pb = self.policy_batch(batch)
            out = run_chunked(
                pb,
                self.chunk_rows,
                self.trim_padding,
                lambda sub, _: {"vf": self._values(self.policy.encode(sub), sub)},
            )
            return out["vf"]

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """V(s) = sum of the heads (the value of the whole reward), shape (B,)."""
        return self.compute_head_values(batch).sum(-1)
