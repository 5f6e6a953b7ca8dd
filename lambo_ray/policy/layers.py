"""Building blocks of the LAMBO network: the input embedding (IE), the deep encoder and one decoder layer.

* :class:`InputEmbedding` maps UE, server and UE-server pair features to ``d_model`` and holds the
  learned prompt embedding, added to every token (the objective steers the whole encoding).
* :class:`EncoderLayer` is pre-norm self-attention + FFN over ``[UE_1..UE_N; S_1..S_M]``; the pair
  features enter as a learned per-head additive bias between UE i and server j, so no width depends on
  M and one model serves every cell size.
* :class:`DecoderLayer` works on any number Q of query UEs at once (Q = 1 while decoding, Q = N under
  teacher forcing), so both paths run the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lambo_ray.policy.config import PolicyConfig
from lambo_ray.policy.features import PAIR_DIM, SERVER_DIM, UE_DIM, PolicyBatch
from lambo_ray.policy.masks import NEG


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, d) -> (..., heads, L, d/heads)"""
    *lead, length, d = x.shape
    return x.reshape(*lead, length, heads, d // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, dh) -> (..., L, heads*dh)"""
    *lead, h, length, dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, h * dh)


class FeedForward(nn.Sequential):
    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__(nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d))


class InputEmbedding(nn.Module):
    """IE: learned linear maps of the static features and the prompt embedding."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ue = nn.Linear(UE_DIM, d)
        self.server = nn.Linear(SERVER_DIM, d)
        self.pair = nn.Linear(PAIR_DIM, d)
        self.prompt = nn.Embedding(cfg.n_prompts, d)

    def forward(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ue(batch.ue), self.server(batch.server), self.pair(batch.pair), self.prompt(batch.prompt)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + FFN; UE<->server attention gets a per-head bias from the pair embedding."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.pair_bias = nn.Linear(d, 2 * self.h)  # heads for UE->server and server->UE
        self.ffn = FeedForward(d, cfg.ffn_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def attn_bias(self, pair_act: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        """(B, H, L, L) additive bias: pair terms in the UE/server off-diagonal blocks, -1e9 on padded keys."""
        b, n, m, _ = pair_act.shape
        pb = self.pair_bias(pair_act)  # (B, N, M, 2H)
        length = n + m
        bias = pair_act.new_zeros(b, self.h, length, length)
        bias[:, :, :n, n:] = pb[..., : self.h].permute(0, 3, 1, 2)
        bias[:, :, n:, :n] = pb[..., self.h :].permute(0, 3, 2, 1)
        return bias + key_pad[:, None, None, :]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.h) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.out(merge_heads(att)))
        return x + self.drop(self.ffn(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        ue: torch.Tensor,
        server: torch.Tensor,
        pair: torch.Tensor,
        prompt: torch.Tensor,
        ue_mask: torch.Tensor,
        server_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = ue.shape[1]
        x = torch.cat([ue, server], dim=1) + prompt[:, None, :]
        valid = torch.cat([ue_mask, server_mask], dim=1)
        key_pad = torch.where(valid, 0.0, NEG).to(x.dtype)
        pair_act = F.gelu(pair)
        for layer in self.layers:
            x = layer(x, layer.attn_bias(pair_act, key_pad))
        x = self.norm(x)
        return x[:, :n], x[:, n:]


class DecoderLayer(nn.Module):
    """Causal self-attention over decision tokens, cross-attention to [UE tokens; dynamic server tokens], FFN."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.norm_sa, self.norm_ca, self.norm_ff, self.norm_mem = (nn.LayerNorm(d) for _ in range(4))
        self.sa_q, self.sa_kv, self.sa_out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ca_q, self.ca_kv, self.ca_out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ffn = FeedForward(d, cfg.ffn_mult, 0.0)
        self.scale = 1.0 / math.sqrt(d // self.h)

    def memory_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention keys/values of decision tokens (B, L, d) -> 2 x (B, H, L, dh)."""
        k, v = self.sa_kv(self.norm_mem(tokens)).chunk(2, dim=-1)
        return split_heads(k, self.h), split_heads(v, self.h)

    def ue_kv(self, ue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.ca_kv(ue).chunk(2, dim=-1)
        return split_heads(k, self.h), split_heads(v, self.h)

    def forward(
        self,
        x: torch.Tensor,  # (B, Q, d) queries (UEs being decided)
        mem_k: torch.Tensor,
        mem_v: torch.Tensor,
        mem_bias: torch.Tensor,  # (B,H,K,dh) x2, (B|1, 1, Q, K)
        ue_k: torch.Tensor,
        ue_v: torch.Tensor,
        ue_bias: torch.Tensor,  # (B,H,N,dh) x2, (B,1,1,N)
        srv: torch.Tensor,
        srv_bias: torch.Tensor,  # (B, Q, M, d) dynamic server tokens, (B,1,1,M)
    ) -> torch.Tensor:
        q = split_heads(self.sa_q(self.norm_sa(x)), self.h)  # (B,H,Q,dh)
        s = torch.matmul(q, mem_k.transpose(-1, -2)) * self.scale + mem_bias
        x = x + self.sa_out(merge_heads(torch.matmul(s.softmax(-1), mem_v)))

        q = split_heads(self.ca_q(self.norm_ca(x)), self.h)  # (B,H,Q,dh)
        sk, sv = self.ca_kv(srv).chunk(2, dim=-1)  # (B,Q,M,d)
        sk, sv = split_heads(sk, self.h), split_heads(sv, self.h)  # (B,Q,H,M,dh)
        s_ue = torch.matmul(q, ue_k.transpose(-1, -2)) * self.scale + ue_bias  # (B,H,Q,N)
        s_srv = torch.einsum("bhqd,bqhmd->bhqm", q, sk) * self.scale + srv_bias  # (B,H,Q,M)
        a = torch.cat([s_ue, s_srv], dim=-1).softmax(-1)
        n = s_ue.shape[-1]
        ctx = torch.matmul(a[..., :n], ue_v) + torch.einsum("bhqm,bqhmd->bhqd", a[..., n:], sv)
        x = x + self.ca_out(merge_heads(ctx))
        return x + self.ffn(self.norm_ff(x))
