"""The LAMBO policy (SPEC section 2): input embedding (IE) + asymmetric encoder-decoder (AED) + dual head.

Structure, and why:

* ``embedding`` maps UE, server and UE-server pair features to ``d_model`` and holds the learned
  prompt embedding, which is added to every token (the objective steers the whole encoding).
* ``encoder`` is deep and runs **once per instance** over the token set ``[UE_1..UE_N; S_1..S_M]``.
  The pair features enter as a learned per-head additive attention bias between UE i and server j,
  so no width depends on M and one model serves every cell size; padding is masked.
* ``decoder`` is shallow (one layer by default) and decides UE after UE in index order: causal
  self-attention over the decision tokens made so far (UE encoding + target embedding + share),
  cross-attention to the encoder output in which every server token carries the *MEC state* (its
  remaining capacity, and UE i's minimum share on it), and the dual head: a pointer-style masked
  softmax over {local, server 1..M} and a Beta distribution over ``u`` in (0, 1), the share being
  ``a_min_ij + u (remaining_j - a_min_ij)``. Masks remove local when it misses the deadline and
  server j when it is unreachable or ``a_min_ij > remaining_j``, so every decoded decision meets
  capacity and deadlines by construction (except a flagged dead end, where nothing fits and the
  UE runs locally so the evaluator reports the miss).

Decoding is incremental (self-attention keys/values are cached, the encoder is never re-run) and
batched over instances; sampling maps pre-drawn noise to actions (:mod:`lambo_ray.policy.sampling`),
so a per-instance seed fixes a decision whatever batch it is decoded in; :meth:`LamboPolicy.teacher_forced` recomputes the same log-probabilities in
one parallel pass for training. The share log-probability is that of ``u`` (the action actually
sampled): the map u -> share is fixed by the state, so its Jacobian does not depend on the
parameters and cancels in every likelihood ratio.

Output mapping: decisions handed to users additionally go through :func:`fill_capacity`, which
spreads each used server's leftover capacity over its UEs in proportion to their shares (shares
only grow, so deadlines and capacity still hold, and latency can only drop). Its inverse on labels,
:func:`claims_from_shares`, turns an expert's full-server shares into the small decode-time claims
the decoder should imitate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lambo_ray.policy.config import PolicyConfig
from lambo_ray.policy.features import PAIR_DIM, SERVER_DIM, UE_DIM, PolicyBatch
from lambo_ray.policy.sampling import DecodeNoise, batch_noise, beta_from_noise, categorical_from_uniform

_NEG = -1e9  # additive mask value (finite: a fully masked row never turns into NaN)
FIT_RTOL = 1e-9  # relative round-off allowed when testing a_min_ij <= remaining_j
N_DYN = 4  # dynamic (MEC state) features per (UE, server): see _dynamic_features


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Encoder output for a batch; everything the decoder needs, computed once per instance."""

    ue: torch.Tensor  # (B, N, d) UE tokens
    server: torch.Tensor  # (B, M, d) server tokens
    pair: torch.Tensor  # (B, N, M, d) pair embeddings (static)
    prompt: torch.Tensor  # (B, d) prompt embedding
    ue_mask: torch.Tensor  # (B, N) bool
    server_mask: torch.Tensor  # (B, M) bool


@dataclass
class DecodeOut:
    target: torch.Tensor  # (B, N) long, 0 = local, j = server j; 0 on padding
    share: torch.Tensor  # (B, N) float64, raw (before fill_capacity); 0 where local / padded
    logp: torch.Tensor  # (B,) sum over real UEs of logp_target + logp_share
    entropy_target: torch.Tensor  # (B, N)
    entropy_share: torch.Tensor  # (B, N), 0 where local / padded
    dead_end: torch.Tensor  # (B,) bool: some UE had no feasible option and was sent local
    dead_ue: torch.Tensor  # (B, N) bool: which UEs were dead ends
    logp_target: torch.Tensor  # (B, N)
    logp_share: torch.Tensor  # (B, N)
    u: torch.Tensor  # (B, N) the Beta sample behind each share (0.5 where local / padded)


@dataclass
class TFOut:
    logp_target: torch.Tensor  # (B, N), 0 on padding
    logp_share: torch.Tensor  # (B, N), 0 where local or padded
    entropy_target: torch.Tensor  # (B, N)
    entropy_share: torch.Tensor  # (B, N)
    logits: torch.Tensor  # (B, N, M+1) masked logits (-1e9 where infeasible)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, d) -> (..., heads, L, d/heads)"""
    *lead, length, d = x.shape
    return x.reshape(*lead, length, heads, d // heads).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
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
        q, k, v = (_split(t, self.h) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.out(_merge(att)))
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
        key_pad = torch.where(valid, 0.0, _NEG).to(x.dtype)
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
        return _split(k, self.h), _split(v, self.h)

    def ue_kv(self, ue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.ca_kv(ue).chunk(2, dim=-1)
        return _split(k, self.h), _split(v, self.h)

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
        q = _split(self.sa_q(self.norm_sa(x)), self.h)  # (B,H,Q,dh)
        s = torch.matmul(q, mem_k.transpose(-1, -2)) * self.scale + mem_bias
        x = x + self.sa_out(_merge(torch.matmul(s.softmax(-1), mem_v)))

        q = _split(self.ca_q(self.norm_ca(x)), self.h)  # (B,H,Q,dh)
        sk, sv = self.ca_kv(srv).chunk(2, dim=-1)  # (B,Q,M,d)
        sk, sv = _split(sk, self.h), _split(sv, self.h)  # (B,Q,H,M,dh)
        s_ue = torch.matmul(q, ue_k.transpose(-1, -2)) * self.scale + ue_bias  # (B,H,Q,N)
        s_srv = torch.einsum("bhqd,bqhmd->bhqm", q, sk) * self.scale + srv_bias  # (B,H,Q,M)
        a = torch.cat([s_ue, s_srv], dim=-1).softmax(-1)
        n = s_ue.shape[-1]
        ctx = torch.matmul(a[..., :n], ue_v) + torch.einsum("bhqm,bqhmd->bhqd", a[..., n:], sv)
        x = x + self.ca_out(_merge(ctx))
        return x + self.ffn(self.norm_ff(x))


class _LayerWeights(NamedTuple):
    """A decoder layer's parameters, fetched once per decode for functional calls in the step loop."""

    ln_sa_w: torch.Tensor
    ln_sa_b: torch.Tensor
    sa_q_w: torch.Tensor
    sa_q_b: torch.Tensor
    sa_out_w: torch.Tensor
    sa_out_b: torch.Tensor
    ln_ca_w: torch.Tensor
    ln_ca_b: torch.Tensor
    ca_q_w: torch.Tensor
    ca_q_b: torch.Tensor
    ca_out_w: torch.Tensor
    ca_out_b: torch.Tensor
    ln_ff_w: torch.Tensor
    ln_ff_b: torch.Tensor
    ff1_w: torch.Tensor
    ff1_b: torch.Tensor
    ff2_w: torch.Tensor
    ff2_b: torch.Tensor
    ln_mem_w: torch.Tensor
    ln_mem_b: torch.Tensor
    sa_kv_w: torch.Tensor
    sa_kv_b: torch.Tensor
    ln_eps: float

    @classmethod
    def of(cls, layer: DecoderLayer) -> _LayerWeights:
        norms = (layer.norm_sa, layer.norm_ca, layer.norm_ff, layer.norm_mem)
        if len({nm.eps for nm in norms}) != 1:
            raise ValueError("decoder layer norms must share one eps")
        ff1, ff2 = layer.ffn[0], layer.ffn[-1]
        return cls(
            layer.norm_sa.weight,
            layer.norm_sa.bias,
            layer.sa_q.weight,
            layer.sa_q.bias,
            layer.sa_out.weight,
            layer.sa_out.bias,
            layer.norm_ca.weight,
            layer.norm_ca.bias,
            layer.ca_q.weight,
            layer.ca_q.bias,
            layer.ca_out.weight,
            layer.ca_out.bias,
            layer.norm_ff.weight,
            layer.norm_ff.bias,
            ff1.weight,
            ff1.bias,
            ff2.weight,
            ff2.bias,
            layer.norm_mem.weight,
            layer.norm_mem.bias,
            layer.sa_kv.weight,
            layer.sa_kv.bias,
            layer.norm_sa.eps,
        )


class Decoder(nn.Module):
    """Shallow decoder + dual head. Works on any number Q of query UEs at once (Q=1 while decoding,
    Q=N under teacher forcing), so both paths run the very same code."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.bos = nn.Parameter(torch.randn(d) * 0.02)  # first memory token: "nothing decided yet"
        self.local_target = nn.Parameter(torch.randn(d) * 0.02)  # target embedding of "local"
        self.server_target = nn.Linear(d, d)  # target embedding of a server, from its token
        self.share_emb = nn.Linear(1, d)
        self.dyn = nn.Linear(N_DYN, d)  # MEC state of server j as seen by UE i
        self.state = nn.Linear(d, d)  # pooled MEC state added to the query
        self.norm_out = nn.LayerNorm(d)
        # Dual head.
        self.ptr_q = nn.Linear(d, d)
        self.ptr_k = nn.Linear(d, d)
        self.local_key = nn.Parameter(torch.randn(d) * 0.02)
        self.local_ue = nn.Linear(d, d)
        self.share_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 2))
        self.reset_head_parameters()

    def reset_head_parameters(self, scale: float = 0.01) -> None:
        """Start near the uniform policy: pointer query and share output scaled down, biases zero.

        With default init the pointer logits of an untrained model reach +-5 (tokens are not small),
        so one option dominates and RL starts with almost no exploration; scaled down, the first
        policy is near-uniform over the feasible options with shares ~ Beta(1.7, 1.7).
        """
        with torch.no_grad():
            for lin in (self.ptr_q, self.share_head[-1]):
                lin.weight.mul_(scale)
                lin.bias.zero_()

    # -- pieces shared by decode and teacher forcing ------------------------------------------
    @staticmethod
    def dynamic_features(rem: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
        """(B,Q,M) remaining capacity and minimum shares (float64) -> (B,Q,M,N_DYN) float32."""
        finite = torch.isfinite(amin)
        fits = finite & (amin <= rem * (1.0 + FIT_RTOL))
        ratio = torch.where(finite & (rem > 0), amin / rem.clamp_min(1e-12), torch.full_like(amin, 2.0))
        slack = torch.where(finite, rem - amin, torch.full_like(amin, -1.0))
        return torch.stack([rem, ratio.clamp(0.0, 2.0), fits.to(rem.dtype), slack.clamp(-1.0, 1.0)], -1).float()

    def dynamic_servers(
        self, enc: Encoded, rows: slice | torch.Tensor, rem: torch.Tensor, amin: torch.Tensor
    ) -> torch.Tensor:
        """Server tokens carrying the MEC state for query UEs ``rows``: (B, Q, M, d)."""
        return enc.server[:, None] + enc.pair[:, rows] + self.dyn(self.dynamic_features(rem, amin))

    def query(self, enc: Encoded, rows: slice, srv: torch.Tensor) -> torch.Tensor:
        m = enc.server_mask[:, None, :, None].to(srv.dtype)
        pooled = (F.gelu(srv) * m).sum(2) / m.sum(2).clamp_min(1.0)
        return enc.ue[:, rows] + enc.prompt[:, None] + self.state(pooled)

    def decision_tokens(self, enc: Encoded, rows: slice, target: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Decision token = UE encoding + target embedding + share embedding, (B, Q, d)."""
        m = enc.server.shape[1]
        srv_idx = (target - 1).clamp(0, m - 1)
        srv_tok = torch.gather(enc.server, 1, srv_idx[..., None].expand(*srv_idx.shape, enc.server.shape[-1]))
        tgt = torch.where((target > 0)[..., None], self.server_target(srv_tok), self.local_target)
        return enc.ue[:, rows] + tgt + self.share_emb(share.float()[..., None])

    def logits(
        self, enc: Encoded, rows: slice, g: torch.Tensor, srv: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Pointer logits over {local, servers}: (B, Q, M+1), -1e9 where not allowed."""
        d = g.shape[-1]
        q = self.ptr_q(g)  # (B,Q,d)
        k_srv = self.ptr_k(srv)  # (B,Q,M,d)
        k_loc = self.local_key + self.local_ue(enc.ue[:, rows])  # (B,Q,d)
        keys = torch.cat([k_loc[:, :, None], k_srv], dim=2)
        score = torch.einsum("bqd,bqkd->bqk", q, keys) / math.sqrt(d)
        score = self.cfg.logit_clip * torch.tanh(score)
        return torch.where(allowed, score, torch.full_like(score, _NEG))

    def beta(self, g: torch.Tensor, srv: torch.Tensor, target: torch.Tensor) -> torch.distributions.Beta:
        idx = (target - 1).clamp_min(0)
        chosen = torch.gather(srv, 2, idx[..., None, None].expand(*idx.shape, 1, srv.shape[-1]))[..., 0, :]
        ab = F.softplus(self.share_head(torch.cat([g, chosen], -1))) + 1.0
        return torch.distributions.Beta(ab[..., 0], ab[..., 1], validate_args=False)

    def run_layers(
        self,
        x: torch.Tensor,
        mems: list[tuple[torch.Tensor, torch.Tensor]],
        mem_bias: torch.Tensor,
        ue_kvs: list[tuple[torch.Tensor, torch.Tensor]],
        ue_bias: torch.Tensor,
        srv: torch.Tensor,
        srv_bias: torch.Tensor,
    ) -> torch.Tensor:
        for layer, (mk, mv), (uk, uv) in zip(self.layers, mems, ue_kvs):
            x = layer(x, mk, mv, mem_bias, uk, uv, ue_bias, srv, srv_bias)
        return self.norm_out(x)


def _decode_loop(
    n: int,
    d: int,
    h: int,
    greedy: bool,
    eps: float,
    fit_scale: float,
    clip: float,
    ptr_scale: float,
    att_scale: float,
    o_ptr: int,
    o_end: int,
    srv_base: list[torch.Tensor],
    w_dyn_t: torch.Tensor,
    q_base: list[torch.Tensor],
    pool_w: torch.Tensor,
    w_state: torch.Tensor,
    b_state: torch.Tensor,
    w_srv: torch.Tensor,
    b_srv: torch.Tensor,
    w_g: torch.Tensor,
    b_g: torch.Tensor,
    w_sh_t: torch.Tensor,
    w_h2: torch.Tensor,
    b_h2: torch.Tensor,
    w_on: torch.Tensor,
    b_on: torch.Tensor,
    eps_on: float,
    k_loc: list[torch.Tensor],
    lw: list[list[torch.Tensor]],
    ln_eps: list[float],
    ca_kt: list[torch.Tensor],
    ca_v: list[torch.Tensor],
    ca_mask: torch.Tensor,
    sa_kt: list[torch.Tensor],
    sa_v: list[torch.Tensor],
    tok_table: torch.Tensor,
    w_share: torch.Tensor,
    ue_tok: list[torch.Tensor],
    amin: list[torch.Tensor],
    amin_ext: list[torch.Tensor],
    srv_static: list[torch.Tensor],
    local_real: list[torch.Tensor],
    rem_ext: torch.Tensor,
    n_uniform: list[torch.Tensor],
    n_normal: list[torch.Tensor],
    n_accept: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step loop of :meth:`LamboPolicy._decode` (see there); TorchScript-compiled when possible, so
    the ~80 small ops per step are dispatched without the Python interpreter in between.

    ``lw[l]`` holds layer l's weights in :class:`_LayerWeights` order (without the eps).
    Returns logits (B,N,M+1), allowed (B,N,M+1), target (B,N), share (B,N) float64, clamped u (B,N)
    and the Beta concentrations (B,N,2).
    """
    b = rem_ext.shape[0]
    m = rem_ext.shape[1] - 1
    dh = d // h
    rem = rem_ext[:, 1:]  # view: updated in place with rem_ext
    w_dyn_b = w_dyn_t.expand(b, w_dyn_t.shape[0], d)
    n_ca = ca_mask.shape[-1]
    logits_l: list[torch.Tensor] = []
    allowed_l: list[torch.Tensor] = []
    target_l: list[torch.Tensor] = []
    share_l: list[torch.Tensor] = []
    u_l: list[torch.Tensor] = []
    ab_l: list[torch.Tensor] = []
    for i in range(n):
        amin_i = amin[i]
        # Dynamic features (same values as Decoder.dynamic_features; inf a_min gives ratio 2, slack -1).
        fits = amin_i <= rem * fit_scale
        ratio = torch.where(rem > 0, amin_i / rem.clamp_min(1e-12), 2.0).clamp_(0.0, 2.0)
        slack = (rem - amin_i).clamp_(-1.0, 1.0)
        feat = torch.stack([rem, ratio, fits.to(rem.dtype), slack], -1).float()  # (B,M,4)
        srv = torch.baddbmm(srv_base[i], feat, w_dyn_b)  # (B,M,d)
        proj = F.linear(srv, w_srv, b_srv)  # (B,M,*)
        pooled = torch.bmm(pool_w, F.gelu(srv)).squeeze(1)
        x = (q_base[i] + F.linear(pooled, w_state, b_state)).unsqueeze(1)  # (B,1,d)
        for li in range(len(lw)):
            w = lw[li]
            le = ln_eps[li]
            # One query per row: (B,1,d) is (B,H,1,dh) without a transpose, and back.
            q = F.linear(F.layer_norm(x, [d], w[0], w[1], le), w[2], w[3]).view(b * h, 1, dh)
            sc = torch.bmm(q, sa_kt[li][:, :, : i + 1]).mul_(att_scale)  # (B*H,1,i+1): slots <= i only
            att = torch.bmm(sc.softmax(-1), sa_v[li][:, : i + 1])
            x = x + F.linear(att.view(b, 1, d), w[4], w[5])
            q = F.linear(F.layer_norm(x, [d], w[6], w[7], le), w[8], w[9]).view(b * h, 1, dh)
            o = 2 * d * li
            ca_kt[li].view(b, h, dh, n_ca)[:, :, :, n_ca - m :] = (
                proj[:, :, o : o + d].view(b, m, h, dh).permute(0, 2, 3, 1)
            )
            ca_v[li].view(b, h, n_ca, dh)[:, :, n_ca - m :] = (
                proj[:, :, o + d : o + 2 * d].view(b, m, h, dh).transpose(1, 2)
            )
            sc = torch.baddbmm(ca_mask, q, ca_kt[li], alpha=att_scale)
            att = torch.bmm(sc.softmax(-1), ca_v[li])
            x = x + F.linear(att.view(b, 1, d), w[10], w[11])
            y = F.gelu(F.linear(F.layer_norm(x, [d], w[12], w[13], le), w[14], w[15]))
            x = x + F.linear(y, w[16], w[17])
        gq = F.linear(F.layer_norm(x.squeeze(1), [d], w_on, b_on, eps_on), w_g, b_g)  # [pointer query | share-head]
        # Pointer head over [local; servers].
        keys = torch.cat([k_loc[i], proj[:, :, o_ptr:o_end]], 1)  # (B,M+1,d)
        score = torch.bmm(keys, gq[:, :d].unsqueeze(2)).squeeze(2)
        srv_ok = srv_static[i] & fits
        allowed = torch.cat([(local_real[i] | ~srv_ok.any(-1)).unsqueeze(1), srv_ok], -1)
        logits = torch.where(allowed, clip * torch.tanh(score * ptr_scale), -1e9)  # _NEG
        if greedy:
            t = logits.argmax(-1)
        else:
            t = categorical_from_uniform(torch.log_softmax(logits, -1), allowed, n_uniform[i])
        # Share head on the chosen server (server 1's token for "local": its share is 0 anyway).
        t1 = t.unsqueeze(1)
        chosen = torch.gather(srv, 1, (t1 - 1).clamp_min(0).unsqueeze(2).expand(b, 1, d)).squeeze(1)
        ab = F.softplus(F.linear(F.gelu(torch.addmm(gq[:, d:], chosen, w_sh_t)), w_h2, b_h2)) + 1.0  # (B,2) Beta
        if greedy:
            u = ab[:, 0] / ab.sum(-1)
        else:
            u = beta_from_noise(ab[:, 0], ab[:, 1], n_normal[i], n_accept[i]).float()
        u = u.clamp(eps, 1.0 - eps)
        lo = torch.gather(amin_ext[i], 1, t1)
        s = lo + u.double().unsqueeze(1) * (torch.gather(rem_ext, 1, t1) - lo)  # (B,1); 0 for local
        rem_ext.scatter_add_(1, t1, -s)
        logits_l.append(logits)
        allowed_l.append(allowed)
        target_l.append(t)
        share_l.append(s)
        u_l.append(u)
        ab_l.append(ab)
        if i + 1 < n:
            tok = (
                ue_tok[i] + torch.gather(tok_table, 1, t1.unsqueeze(2).expand(b, 1, d)).squeeze(1) + s.float() * w_share
            )
            for li in range(len(lw)):
                w = lw[li]
                kv = F.linear(F.layer_norm(tok, [d], w[18], w[19], ln_eps[li]), w[20], w[21])  # (B,2d)
                sa_kt[li].view(b, h, dh, n)[:, :, :, i + 1] = kv[:, :d].view(b, h, dh)
                sa_v[li].view(b, h, n, dh)[:, :, i + 1] = kv[:, d:].view(b, h, dh)
    return (
        torch.stack(logits_l, 1),
        torch.stack(allowed_l, 1),
        torch.stack(target_l, 1),
        torch.cat(share_l, 1),
        torch.stack(u_l, 1),
        torch.stack(ab_l, 1),
    )


_SCRIPTED_LOOP: list = []  # [compiled function] once tried; [None] when TorchScript is unavailable


def _loop_fn():
    """The compiled step loop, or the plain Python function where TorchScript cannot compile it.

    Why TorchScript and not ``torch.compile``: the loop is ~80 tiny ops per step whose cost is dispatch,
    not arithmetic; TorchScript removes the interpreter between them (~1.6x at B=1) with a compile of
    well under a second and no C++ toolchain, where Inductor would need one and minutes of compiling
    per shape. ``torch.jit.script`` is deprecated in this torch; if it ever stops compiling this, the
    eager function (the same code) runs instead, with a warning.
    """
    if not _SCRIPTED_LOOP:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _SCRIPTED_LOOP.append(torch.jit.script(_decode_loop))
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            warnings.warn(
                f"TorchScript could not compile the decode loop ({type(err).__name__}: {err}); decoding runs eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            _SCRIPTED_LOOP.append(None)
    return _SCRIPTED_LOOP[0] or _decode_loop


def allowed_options(
    rem: torch.Tensor,
    amin: torch.Tensor,
    local_ok: torch.Tensor,
    server_mask: torch.Tensor,
    ue_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feasible options (B,Q,M+1) given remaining capacity before each query UE; and dead ends (B,Q).

    ``FIT_RTOL`` lets an expert's label whose share equals the remaining capacity up to round-off stay
    allowed under teacher forcing; a share built on such a server exceeds capacity or misses the
    deadline by at most that relative 1e-9, far inside the evaluator's tolerance.
    A dead end (nothing fits) and a padded UE both get "local" as their only option, so their
    distribution is deterministic (log-prob 0, entropy 0) and never NaN.
    """
    srv_ok = server_mask[:, None, :] & torch.isfinite(amin) & (amin <= rem * (1.0 + FIT_RTOL))
    opts = torch.cat([local_ok[..., None], srv_ok], dim=-1) & ue_mask[..., None]
    dead = ~opts.any(-1)
    opts = opts.clone()
    opts[..., 0] |= dead
    return opts, dead & ue_mask


def categorical_entropy(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(torch.where(allowed, logp.exp() * logp, torch.zeros_like(logp))).sum(-1)


def fill_capacity(target: torch.Tensor, share: torch.Tensor, n_servers: int) -> torch.Tensor:
    """Output mapping: scale every used server's shares so they sum to exactly 1.

    Shares only grow (each is divided by its server's load <= 1), so a share that met its
    deadline still does, and capacity holds with equality. Local/padded entries stay 0.
    """
    off = target > 0
    load = torch.zeros(*target.shape[:-1], n_servers + 1, dtype=share.dtype, device=share.device)
    load.scatter_add_(-1, target, torch.where(off, share, torch.zeros_like(share)))
    per_ue = torch.gather(load, -1, target)
    return torch.where(off & (per_ue > 0), share / per_ue.clamp_min(1e-300), share)


def claims_from_shares(target: torch.Tensor, share: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
    """The smallest decode-time shares ("claims") that :func:`fill_capacity` maps back onto ``share``.

    Use it on expert labels before teacher forcing (ALEF, supervised warm start). The decoder claims
    shares UE after UE out of what is left, and the output mapping scales every used server up to a
    full load; an expert's water-filled shares already fill each server, so imitating them literally
    teaches early UEs to claim the capacity later UEs on the same server need (greedy decoding then
    finds servers full and sends UEs local: a 27% gap on min_energy at N=20 in our check, against
    0.4% with claims). Claims are ``kappa_j * share_i`` with ``kappa_j = max_i a_min_ij / share_i`` over
    the UEs on server j: still >= a_min (deadlines hold), proportional to the shares, so
    ``fill_capacity(claims) == share`` whenever the labels use each server fully.
    ``target`` (B, N), ``share`` (B, N), ``amin`` (B, N, M) as in :class:`PolicyBatch`.
    """
    share = share.double()
    target = target.long()
    off = target > 0
    a = torch.gather(amin.double(), -1, (target - 1).clamp_min(0)[..., None])[..., 0]
    ratio = torch.where(off & (share > 0), a / share.clamp_min(1e-300), torch.ones_like(share))
    ratio = torch.where(off, ratio.clamp(max=1.0), torch.zeros_like(share))  # > 1 only for infeasible labels
    kappa = torch.zeros(*target.shape[:-1], amin.shape[-1] + 1, dtype=share.dtype, device=share.device)
    kappa = kappa.scatter_reduce(-1, target, ratio, reduce="amax")
    return torch.where(off, share * torch.gather(kappa, -1, target), torch.zeros_like(share))


# ----------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------
class LamboPolicy(nn.Module):
    """IE + deep encoder + shallow decoder with dual head. Plain torch: no Ray needed."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = InputEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # -- parameter groups (ALEF freezes the encoder side) --------------------------------------
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.embedding.parameters()
        yield from self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.decoder.parameters()

    # -- encoder --------------------------------------------------------------------------------
    def encode(self, batch: PolicyBatch) -> Encoded:
        ue, server, pair, prompt = self.embedding(batch)
        h_ue, h_srv = self.encoder(ue, server, pair, prompt, batch.ue_mask, batch.server_mask)
        return Encoded(
            ue=h_ue,
            server=h_srv,
            pair=pair,
            prompt=prompt,
            ue_mask=batch.ue_mask,
            server_mask=batch.server_mask,
        )

    @staticmethod
    def pooled(enc: Encoded) -> torch.Tensor:
        """Masked mean of all encoder tokens, (B, d): the critics' input."""
        x = torch.cat([enc.ue, enc.server], 1)
        m = torch.cat([enc.ue_mask, enc.server_mask], 1)[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)

    @staticmethod
    def fill_capacity(target: torch.Tensor, share: torch.Tensor, n_servers: int) -> torch.Tensor:
        return fill_capacity(target, share, n_servers)

    def _biases(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        ue_bias = torch.where(enc.ue_mask, 0.0, _NEG)[:, None, None, :].to(enc.ue.dtype)
        srv_bias = torch.where(enc.server_mask, 0.0, _NEG)[:, None, None, :].to(enc.ue.dtype)
        return ue_bias, srv_bias

    def _share_from_u(self, u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return lo + u.double() * (hi - lo)

    # -- autoregressive decoding ----------------------------------------------------------------
    def decode(
        self,
        batch: PolicyBatch,
        enc: Encoded,
        mode: str = "greedy",
        generator: torch.Generator | None = None,
        noise: DecodeNoise | None = None,
    ) -> DecodeOut:
        """Decide every UE in index order, batched over instances, with cached self-attention K/V.

        ``sample`` draws its randomness up front (:mod:`lambo_ray.policy.sampling`): from ``noise`` if
        given (per-instance seeds: the decision then does not depend on batch composition or padding),
        else from ``generator`` (or torch's global RNG) for the whole batch.
        """
        if mode not in ("greedy", "sample"):
            raise ValueError(f"decode mode must be 'greedy' or 'sample', got {mode!r}")
        if mode == "sample" and noise is None:
            noise = batch_noise(batch.batch_size, batch.n_max, generator)
        if noise is not None:
            noise = noise.to(enc.ue.device)
        return self._decode(batch, enc, noise=noise if mode == "sample" else None)

    def _decode(self, batch: PolicyBatch, enc: Encoded, noise: DecodeNoise | None) -> DecodeOut:
        """Greedy (argmax target, Beta-mean share) when ``noise`` is None, else sampled from it.

        At serving batch sizes the per-step cost is per-op overhead (dozens of tiny ops x N steps), so
        the step loop (:func:`_decode_loop`) is kept lean and TorchScript-compiled. The model is the
        same as :meth:`teacher_forced`'s, which stays the plain reference (tests pin decode to it and to
        an uncached step-by-step decoder):

        * everything that does not depend on earlier decisions is computed once per batch: server +
          pair tokens, query base, cross-attention K/V of the UE tokens, pointer key of "local", the
          decision-token table, static masks; layer weights are fetched once (no module calls);
        * the only step-dependent input is the remaining capacity, entering through the 4 dynamic
          features; the linear maps of the dynamic server tokens (cross-attention K/V of every layer,
          pointer keys) are one fused matmul, and the share head's server half runs on the chosen
          server only;
        * self-attention reads the first ``i + 1`` slots of a preallocated K/V cache (no mask);
          cross-attention writes the server keys into a preallocated ``[UE; server]`` K/V buffer;
        * log-probabilities and entropies need no per-step work: logits, masks and Beta parameters are
          stacked and scored once after the loop, with the formulas teacher forcing uses;
        * no ``torch.distributions`` objects and no host syncs inside the loop.
        """
        dec, eps, cfg = self.decoder, self.cfg.share_eps, self.cfg
        b, n, m = batch.batch_size, batch.n_max, batch.m_max
        d, h = cfg.d_model, cfg.n_heads
        dh = d // h
        layers = list(dec.layers)
        dt = enc.ue.dtype

        # ---- step-independent pieces -------------------------------------------------------
        lw = [_LayerWeights.of(layer) for layer in layers]
        srv_base = (enc.server[:, None] + enc.pair + dec.dyn.bias).unbind(1)  # N x (B,M,d)
        q_base = (enc.ue + enc.prompt[:, None]).unbind(1)  # N x (B,d)
        smask = enc.server_mask.to(dt)
        pool_w = (smask / smask.sum(1, keepdim=True).clamp_min(1.0))[:, None, :]  # (B,1,M): masked mean
        # One fused map of the dynamic server tokens: [ca_k|ca_v per layer, pointer key]; the share head's
        # server half only runs on the chosen server.
        w1, b1 = dec.share_head[0].weight, dec.share_head[0].bias
        w_srv = torch.cat([*(layer.ca_kv.weight for layer in layers), dec.ptr_k.weight], 0)
        b_srv = torch.cat([*(layer.ca_kv.bias for layer in layers), dec.ptr_k.bias])
        o_ptr = 2 * d * len(layers)
        # And one of the decoder output g: [pointer query, share-head g half].
        w_g, b_g = torch.cat([dec.ptr_q.weight, w1[:, :d]], 0), torch.cat([dec.ptr_q.bias, b1])
        k_loc = (dec.local_key + dec.local_ue(enc.ue))[:, :, None].unbind(1)  # N x (B,1,d)
        # Cross-attention K/V buffers [UE tokens; servers] per layer, heads folded into the batch; the
        # server part is rewritten per step. Keys are stored transposed, (B*H,dh,L): scores are bmm's.
        ca_kt, ca_v = [], []
        for layer in layers:
            uk, uv = layer.ue_kv(enc.ue)  # (B,H,N,dh)
            ca_kt.append(torch.cat([uk.transpose(-1, -2), uk.new_zeros(b, h, dh, m)], 3).reshape(b * h, dh, n + m))
            ca_v.append(torch.cat([uv, uv.new_zeros(b, h, m, dh)], 2).reshape(b * h, n + m, dh))
        ca_mask = torch.where(torch.cat([enc.ue_mask, enc.server_mask], 1), 0.0, _NEG).to(dt)
        ca_mask = ca_mask[:, None, None, :].expand(b, h, 1, n + m).reshape(b * h, 1, n + m)
        # Self-attention cache: slot 0 = BOS, slot i+1 = decision of UE i.
        bos = dec.bos.to(dt).expand(b, 1, -1)
        sa_kt, sa_v = [], []
        for layer in layers:
            k0, v0 = layer.memory_kv(bos)  # (B,H,1,dh)
            k, v = k0.new_zeros(b, h, dh, n), v0.new_zeros(b, h, n, dh)
            k[..., :1], v[:, :, :1] = k0.transpose(-1, -2), v0
            sa_kt.append(k.view(b * h, dh, n))
            sa_v.append(v.view(b * h, n, dh))
        # Decision tokens: UE token + row t of [local target; server targets] (+ share bias) + share * w.
        tok_table = (
            torch.cat([dec.local_target.to(dt).expand(b, 1, d), dec.server_target(enc.server)], 1) + dec.share_emb.bias
        )  # (B,M+1,d)
        # Masks and a_min: inf (unreachable, padded) stays inf, so "fits" and the dynamic features need
        # no isfinite per step; slot 0 of the *_ext arrays stands for "local" (a_min = remaining = 0,
        # so a local decision gets share exactly 0 from the same formula as a server).
        amin_full = torch.where(torch.isfinite(batch.amin), batch.amin, math.inf)
        amin_ext = F.pad(torch.where(torch.isfinite(amin_full), amin_full, 0.0), (1, 0))  # (B,N,M+1)
        srv_static = enc.server_mask[:, None, :] & batch.ue_mask[..., None] & torch.isfinite(amin_full)
        local_real_full = batch.local_ok & batch.ue_mask
        rem_ext = F.pad(torch.where(batch.server_mask, 1.0, 0.0).to(torch.float64), (1, 0))  # (B,M+1)
        if noise is not None:
            n_uniform, n_normal, n_accept = (
                noise.uniform.unbind(1),
                noise.normal.unbind(1),
                noise.accept.unbind(1),
            )
        else:
            n_uniform = n_normal = n_accept = []

        logits, allowed, target, share, u, ab = _loop_fn()(
            n,
            d,
            h,
            noise is None,
            float(eps),
            1.0 + FIT_RTOL,
            float(cfg.logit_clip),
            1.0 / math.sqrt(d),
            1.0 / math.sqrt(dh),
            o_ptr,
            o_ptr + d,
            list(srv_base),
            dec.dyn.weight.t(),
            list(q_base),
            pool_w,
            dec.state.weight,
            dec.state.bias,
            w_srv,
            b_srv,
            w_g,
            b_g,
            w1[:, d:].t(),
            dec.share_head[2].weight,
            dec.share_head[2].bias,
            dec.norm_out.weight,
            dec.norm_out.bias,
            float(dec.norm_out.eps),
            list(k_loc),
            [list(w[:-1]) for w in lw],
            [float(w.ln_eps) for w in lw],
            ca_kt,
            ca_v,
            ca_mask,
            sa_kt,
            sa_v,
            tok_table,
            dec.share_emb.weight[:, 0],
            list(enc.ue.unbind(1)),
            list(amin_full.unbind(1)),
            list(amin_ext.unbind(1)),
            list(srv_static.unbind(1)),
            list(local_real_full.unbind(1)),
            rem_ext,
            list(n_uniform),
            list(n_normal),
            list(n_accept),
        )

        # ---- scoring, once for all steps (formulas shared with teacher forcing) --------------------
        real = batch.ue_mask
        off = target > 0
        u = torch.where(off, u, 0.5)
        lp_t = torch.where(real, torch.gather(torch.log_softmax(logits, -1), -1, target[..., None])[..., 0], 0.0)
        ent_t = torch.where(real, categorical_entropy(logits, allowed), 0.0)
        beta = torch.distributions.Beta(ab[..., 0], ab[..., 1], validate_args=False)
        lp_s = torch.where(off, beta.log_prob(u), 0.0)
        ent_s = torch.where(off, beta.entropy(), 0.0)
        dead_ue = real & ~local_real_full & ~allowed[..., 1:].any(-1)
        return DecodeOut(
            target=target,
            share=share,
            logp=(lp_t + lp_s).sum(-1),
            entropy_target=ent_t,
            entropy_share=ent_s,
            dead_end=dead_ue.any(-1),
            dead_ue=dead_ue,
            logp_target=lp_t,
            logp_share=lp_s,
            u=u,
        )

    # -- teacher forcing ------------------------------------------------------------------------
    def teacher_forced(
        self,
        batch: PolicyBatch,
        enc: Encoded,
        target: torch.Tensor,
        share: torch.Tensor,
        u: torch.Tensor | None = None,
    ) -> TFOut:
        """Log-probs and entropies of given decisions in one parallel pass (causal mask).

        The remaining capacity before UE i is 1 minus the exclusive cumulative sum of earlier shares
        on each server. ``u`` (the Beta samples) may be passed to skip inverting the share map; it is
        recovered from ``share`` otherwise (exact when ``share`` is the float64 decode output).
        """
        dec, eps = self.decoder, self.cfg.share_eps
        b, n, m = batch.batch_size, batch.n_max, batch.m_max
        target = target.long()
        share = share.double()
        real = batch.ue_mask
        target = torch.where(real, target, 0)
        off = target > 0
        share = torch.where(off, share, 0.0)
        used = F.one_hot(target, m + 1)[..., 1:].double() * share[..., None]  # (B,N,M)
        rem = torch.where(batch.server_mask, 1.0, 0.0).double()[:, None, :] - (used.cumsum(1) - used)
        rows = slice(0, n)
        srv = dec.dynamic_servers(enc, rows, rem, batch.amin)
        x = dec.query(enc, rows, srv)
        tokens = torch.cat(
            [
                dec.bos.to(x.dtype).expand(b, 1, -1),
                dec.decision_tokens(enc, slice(0, n - 1), target[:, :-1], share[:, :-1]),
            ],
            1,
        )
        mems = [layer.memory_kv(tokens) for layer in dec.layers]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mem_bias = torch.where(causal, 0.0, _NEG).to(x.dtype)[None, None]
        ue_bias, srv_bias = self._biases(enc)
        ue_kvs = [layer.ue_kv(enc.ue) for layer in dec.layers]
        g = dec.run_layers(x, mems, mem_bias, ue_kvs, ue_bias, srv, srv_bias)
        allowed, _ = allowed_options(rem, batch.amin, batch.local_ok, batch.server_mask, real)
        logits = dec.logits(enc, rows, g, srv, allowed)
        logp_all = torch.log_softmax(logits, -1)
        lp_t = torch.where(real, torch.gather(logp_all, -1, target[..., None])[..., 0], 0.0)
        ent_t = torch.where(real, categorical_entropy(logits, allowed), 0.0)
        beta = dec.beta(g, srv, target)
        if u is None:
            j = (target - 1).clamp_min(0)
            lo = torch.gather(batch.amin, 2, j[..., None])[..., 0]
            hi = torch.gather(rem, 2, j[..., None])[..., 0]
            safe = off & torch.isfinite(lo) & (hi > lo)
            u = torch.where(safe, (share - torch.where(safe, lo, 0.0)) / torch.where(safe, hi - lo, 1.0), 0.5)
        u = torch.where(off, u.float().clamp(eps, 1.0 - eps), 0.5)
        lp_s = torch.where(off, beta.log_prob(u), 0.0)
        ent_s = torch.where(off, beta.entropy(), 0.0)
        return TFOut(logp_target=lp_t, logp_share=lp_s, entropy_target=ent_t, entropy_share=ent_s, logits=logits)

    def forward(self, batch: PolicyBatch, mode: str = "greedy") -> DecodeOut:
        return self.decode(batch, self.encode(batch), mode=mode)
