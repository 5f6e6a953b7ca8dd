"""The LAMBO policy network: input embedding (IE) + asymmetric encoder-decoder (AED) + dual head.

Structure, and why:

* ``embedding`` maps UE, server and UE-server pair features to ``d_model`` and holds the learned
  prompt embedding, which is added to every token (the objective steers the whole encoding).
* ``encoder`` is deep and runs **once per instance** over the token set ``[UE_1..UE_N; S_1..S_M]``.
  The pair features enter as a learned per-head additive attention bias between UE i and server j,
  so no width depends on M and one model serves every cell size; padding is masked.
* ``decoder`` is shallow (one layer by default) and decides UE after UE in position order: causal
  self-attention over the decision tokens made so far (UE encoding + target embedding + share),
  cross-attention to the encoder output in which every server token carries the *MEC state* (the
  capacity free for UE i, and its minimum share there), and the dual head: a pointer-style masked
  softmax over {local, server 1..M} and a Beta distribution over ``u`` in (0, 1), the share being
  ``a_min_ij + u (free_ij - a_min_ij)``. The masks and the free capacity (:mod:`lambo_ray.policy.masks`)
  make every decision feasible by construction whenever the instance has a feasible decision.

Decoding is incremental and batched over instances (:mod:`lambo_ray.policy.fast_decode`, the encoder
is never re-run); sampling maps pre-drawn noise to actions (:mod:`lambo_ray.policy.sampling`), so a
per-instance seed fixes a decision whatever batch it is decoded in; :meth:`LamboPolicy.teacher_forced`
recomputes the same log-probabilities in one parallel pass for training. The share log-probability is
that of ``u`` (the action actually sampled): the map u -> share is fixed by the state, so its Jacobian
does not depend on the parameters and cancels in every likelihood ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lambo_ray.policy.config import PolicyConfig
from lambo_ray.policy.features import PolicyBatch
from lambo_ray.policy.layers import DecoderLayer, Encoder, InputEmbedding
from lambo_ray.policy.masks import (
    FIT_RTOL,
    NEG,
    allowed_options,
    categorical_entropy,
    future_demand,
    output_shares,
    reserved_after,
    spare_fractions,
)
from lambo_ray.policy.sampling import DecodeNoise, batch_noise

N_DYN = 7  # dynamic (MEC state) features per (UE, server): see Decoder.dynamic_features


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
    share: torch.Tensor  # (B, N) float64, the decision's shares (output_shares); 0 where local / padded
    logp: torch.Tensor  # (B,) sum over real UEs of logp_target + logp_share
    entropy_target: torch.Tensor  # (B, N)
    entropy_share: torch.Tensor  # (B, N), 0 where local / padded
    dead_end: torch.Tensor  # (B,) bool: some UE had no feasible option and was sent local
    dead_ue: torch.Tensor  # (B, N) bool: which UEs were dead ends
    logp_target: torch.Tensor  # (B, N)
    logp_share: torch.Tensor  # (B, N)
    u: torch.Tensor  # (B, N) the share head's action: fraction of the server's spare (0.5 where local / padded)


@dataclass
class TFOut:
    logp_target: torch.Tensor  # (B, N), 0 on padding
    logp_share: torch.Tensor  # (B, N), 0 where local or padded
    entropy_target: torch.Tensor  # (B, N)
    entropy_share: torch.Tensor  # (B, N)
    logits: torch.Tensor  # (B, N, M+1) masked logits (-1e9 where infeasible)


def latency_marginal(batch: PolicyBatch, load: torch.Tensor) -> torch.Tensor:
    """(B,Q,M) what UE i would add to the total latency on server j, over its local latency, given the
    sum of sqrt(work) ``load`` (B,Q,M) already on each server: with optimal shares a server's compute
    term is (sum_k sqrt w_k)^2, so i adds tx_ij + w_ij + 2 sqrt(w_ij) load_j. The greedy heuristic's own
    criterion for min_latency (deadlines aside); the decoder could not compute it from shares alone."""
    return batch.lat_base + 2.0 * load * batch.sqrt_work / batch.local_lat[..., None].clamp_min(1e-9)


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
    def dynamic_features(
        free: torch.Tensor, amin: torch.Tensor, future: torch.Tensor, progress: torch.Tensor, marginal: torch.Tensor
    ) -> torch.Tensor:
        """The MEC state as UE i sees it, (B,Q,M,N_DYN) float32, from (B,Q,M) float64 free capacity,
        minimum shares, future demand (:func:`~lambo_ray.policy.masks.future_demand`) and latency marginal
        (:func:`latency_marginal`) and the (B,Q) fraction of UEs already decided: free capacity,
        a_min / free, whether it fits, free - a_min, log(1 + future demand / free), the progress and
        log(marginal latency / local latency)."""
        finite = torch.isfinite(amin)
        fits = finite & (amin <= free * (1.0 + FIT_RTOL))
        ratio = torch.where(finite & (free > 0), amin / free.clamp_min(1e-12), torch.full_like(amin, 2.0))
        slack = torch.where(finite, free - amin, torch.full_like(amin, -1.0))
        pressure = torch.log1p(future / free.clamp_min(1e-2)).clamp(0.0, 6.0)
        return torch.stack(
            [
                free,
                ratio.clamp(0.0, 2.0),
                fits.to(free.dtype),
                slack.clamp(-1.0, 1.0),
                pressure,
                progress[..., None].expand_as(free).to(free.dtype),
                torch.log(marginal).clamp(-5.0, 5.0),
            ],
            -1,
        ).float()

    def dynamic_servers(
        self,
        enc: Encoded,
        rows: slice | torch.Tensor,
        free: torch.Tensor,
        amin: torch.Tensor,
        future: torch.Tensor,
        progress: torch.Tensor,
        marginal: torch.Tensor,
    ) -> torch.Tensor:
        """Server tokens carrying the MEC state for query UEs ``rows``: (B, Q, M, d)."""
        feats = self.dynamic_features(free, amin, future, progress, marginal)
        return enc.server[:, None] + enc.pair[:, rows] + self.dyn(feats)

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
        return torch.where(allowed, score, torch.full_like(score, NEG))

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
    def biases(enc: Encoded, first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention biases for query positions ``first .. first + count - 1``: UE keys (B,1,Q,N)
        open only for real UEs not decided yet (position >= the query's: the decoder attends to what
        remains, the decisions made so far are in its self-attention), server keys (B,1,1,M)."""
        n = enc.ue.shape[1]
        count = n - first if count is None else count
        pos = torch.arange(n, device=enc.ue.device)
        remaining = pos[None, :] >= (first + torch.arange(count, device=enc.ue.device))[:, None]  # (Q, N)
        ue_ok = enc.ue_mask[:, None, None, :] & remaining[None, None]
        ue_bias = torch.where(ue_ok, 0.0, NEG).to(enc.ue.dtype)
        srv_bias = torch.where(enc.server_mask, 0.0, NEG)[:, None, None, :].to(enc.ue.dtype)
        return ue_bias, srv_bias

    @staticmethod
    def progress(batch: PolicyBatch) -> torch.Tensor:
        """(B, N) fraction of the instance's UEs decided before each position."""
        n_real = batch.ue_mask.sum(-1, keepdim=True).clamp_min(1).to(torch.float64)
        return torch.arange(batch.n_max, dtype=torch.float64, device=batch.amin.device)[None] / n_real

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
        """Greedy (argmax target, Beta-mean share) when ``noise`` is None, else sampled from it; the step
        loop is :func:`lambo_ray.policy.fast_decode.run`, scored here once for all steps with the
        formulas teacher forcing uses."""
        from lambo_ray.policy import fast_decode

        logits, allowed, target, u, ab = fast_decode.run(self, batch, enc, noise)
        real = batch.ue_mask
        off = target > 0
        u = torch.where(off, u, 0.5)
        share = output_shares(target, u, batch.amin)
        lp_t = torch.where(real, torch.gather(torch.log_softmax(logits, -1), -1, target[..., None])[..., 0], 0.0)
        ent_t = torch.where(real, categorical_entropy(logits, allowed), 0.0)
        beta = torch.distributions.Beta(ab[..., 0], ab[..., 1], validate_args=False)
        lp_s = torch.where(off, beta.log_prob(u), 0.0)
        ent_s = torch.where(off, beta.entropy(), 0.0)
        dead_ue = real & ~(batch.local_ok & real) & ~allowed[..., 1:].any(-1)
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
        """Log-probs and entropies of given decisions (in decode order) in one parallel pass.

        The capacity held before UE i is the exclusive cumulative sum of earlier minimum shares on each
        server. ``u`` (the share head's sampled fractions) may be passed, as RL does; otherwise it is
        recovered from ``share`` by :func:`~lambo_ray.policy.masks.spare_fractions` (expert labels).
        """
        dec, eps = self.decoder, self.cfg.share_eps
        b, n, m = batch.batch_size, batch.n_max, batch.m_max
        real = batch.ue_mask
        target = torch.where(real, target.long(), 0)
        off = target > 0
        if u is None:
            u = spare_fractions(target, share, batch.amin)
        u = torch.where(off, u.double().clamp(eps, 1.0 - eps), 0.5)
        onehot = F.one_hot(target, m + 1)[..., 1:].double()  # (B,N,M)
        held = onehot * torch.where(torch.isfinite(batch.amin), batch.amin, 0.0)
        rem = torch.where(batch.server_mask, 1.0, 0.0).double()[:, None, :] - (held.cumsum(1) - held)
        free = rem - reserved_after(batch.reserve)
        on_srv = onehot * batch.sqrt_work
        marginal = latency_marginal(batch, on_srv.cumsum(1) - on_srv)
        rows = slice(0, n)
        srv = dec.dynamic_servers(
            enc, rows, free, batch.amin, future_demand(batch.amin), self.progress(batch), marginal
        )
        x = dec.query(enc, rows, srv)
        tokens = torch.cat(
            [
                dec.bos.to(x.dtype).expand(b, 1, -1),
                dec.decision_tokens(enc, slice(0, n - 1), target[:, :-1], torch.where(off, u, 0.0)[:, :-1]),
            ],
            1,
        )
        mems = [layer.memory_kv(tokens) for layer in dec.layers]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mem_bias = torch.where(causal, 0.0, NEG).to(x.dtype)[None, None]
        ue_bias, srv_bias = self.biases(enc)
        ue_kvs = [layer.ue_kv(enc.ue) for layer in dec.layers]
        g = dec.run_layers(x, mems, mem_bias, ue_kvs, ue_bias, srv, srv_bias)
        allowed, _ = allowed_options(free, batch.amin, batch.local_ok, batch.server_mask, real)
        logits = dec.logits(enc, rows, g, srv, allowed)
        logp_all = torch.log_softmax(logits, -1)
        lp_t = torch.where(real, torch.gather(logp_all, -1, target[..., None])[..., 0], 0.0)
        ent_t = torch.where(real, categorical_entropy(logits, allowed), 0.0)
        beta = dec.beta(g, srv, target)
        lp_s = torch.where(off, beta.log_prob(u.float()), 0.0)
        ent_s = torch.where(off, beta.entropy(), 0.0)
        return TFOut(logp_target=lp_t, logp_share=lp_s, entropy_target=ent_t, entropy_share=ent_s, logits=logits)

    def forward(self, batch: PolicyBatch, mode: str = "greedy") -> DecodeOut:
        return self.decode(batch, self.encode(batch), mode=mode)
