# ruff: noqa: UP006, UP007, UP037, UP045  (TorchScript: typing.List/Tuple/Optional, no postponed annotations)
"""The fast incremental decode kernel: the decoder's step loop, TorchScript-compiled, and the choice
between it and its Numba twin for small CPU batches (:func:`kernel_for`, :mod:`lambo_ray.policy.cpu_kernel`).

It computes exactly what :meth:`lambo_ray.policy.model.LamboPolicy.teacher_forced` scores (tests pin it
to that and to an uncached step-by-step reference), but at serving batch sizes the per-step cost is
per-op overhead (dozens of tiny ops x N steps), so the loop is kept lean:

* everything that does not depend on earlier decisions is computed once per batch
  (:func:`step_tensors`, :func:`statics_and_dims`): server + pair tokens, query base, cross-attention
  K/V of the UE tokens, pointer key of "local", the decision-token table, static masks, the capacity
  reserved for later must-offload UEs; layer weights are fetched once into named structures (no
  module calls in the loop);
* the only step-dependent input is the free capacity (remaining minus reserved), entering through the
  4 dynamic features; the linear maps of the dynamic server tokens (cross-attention K/V of every layer,
  pointer keys) are one fused matmul, and the share head's server half runs on the chosen server only;
* self-attention reads the first ``i + 1`` slots of a preallocated K/V cache (no mask); cross-attention
  writes the server keys into a preallocated ``[UE; server]`` K/V buffer;
* log-probabilities and entropies need no per-step work: logits, masks and Beta parameters are
  returned stacked and scored once after the loop by the model;
* no ``torch.distributions`` objects and no host syncs inside the loop.

Why TorchScript and not ``torch.compile``: the loop is ~80 tiny ops per step whose cost is dispatch,
not arithmetic; TorchScript removes the interpreter between them (~1.6x at B=1) with a compile of well
under a second and no C++ toolchain, where Inductor would need one and minutes of compiling per shape.
``torch.jit.script`` is deprecated in this torch; if it ever stops compiling this, the eager function
(the same code) runs instead, with a warning.
"""

import math
import os
import warnings
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple  # noqa: UP035

import torch
import torch.nn.functional as F
from torch import Tensor

from lambo_ray.policy.masks import FIT_RTOL, NEG, future_demand, reserved_after
from lambo_ray.policy.sampling import DecodeNoise, beta_from_noise, categorical_from_uniform

if TYPE_CHECKING:
    from lambo_ray.policy.features import PolicyBatch
    from lambo_ray.policy.layers import DecoderLayer
    from lambo_ray.policy.model import Decoder, Encoded, LamboPolicy


class LayerWeights(NamedTuple):
    """One decoder layer's parameters, fetched once per decode for functional calls in the loop."""

    ln_sa_w: Tensor
    ln_sa_b: Tensor
    sa_q_w: Tensor
    sa_q_b: Tensor
    sa_out_w: Tensor
    sa_out_b: Tensor
    ln_ca_w: Tensor
    ln_ca_b: Tensor
    ca_q_w: Tensor
    ca_q_b: Tensor
    ca_out_w: Tensor
    ca_out_b: Tensor
    ln_ff_w: Tensor
    ln_ff_b: Tensor
    ff1_w: Tensor
    ff1_b: Tensor
    ff2_w: Tensor
    ff2_b: Tensor
    ln_mem_w: Tensor
    ln_mem_b: Tensor
    sa_kv_w: Tensor
    sa_kv_b: Tensor
    ln_eps: float


class LayerCache(NamedTuple):
    """Attention buffers of one layer, heads folded into the batch, keys stored transposed."""

    ca_kt: Tensor  # (B*H, dh, N+M) cross-attention keys [UE tokens; servers]; servers rewritten per step
    ca_v: Tensor  # (B*H, N+M, dh)
    sa_kt: Tensor  # (B*H, dh, N) self-attention keys: slot 0 = BOS, slot i+1 = decision of UE i
    sa_v: Tensor  # (B*H, N, dh)


class HeadWeights(NamedTuple):
    """Decoder-level weights: dynamic server features, MEC-state query, fused projections, dual head."""

    w_dyn_t: Tensor  # (N_DYN, d)
    w_state: Tensor
    b_state: Tensor
    w_srv: Tensor  # [ca_k|ca_v per layer, pointer key] fused over the dynamic server tokens
    b_srv: Tensor
    w_g: Tensor  # [pointer query, share-head g half] fused over the decoder output
    b_g: Tensor
    w_sh_t: Tensor  # share head, chosen-server half (transposed)
    w_h2: Tensor
    b_h2: Tensor
    w_on: Tensor  # output norm
    b_on: Tensor
    w_share: Tensor  # share embedding of the decision token
    eps_on: float


class Dims(NamedTuple):
    n: int
    d: int
    h: int
    greedy: bool
    share_eps: float
    fit_scale: float
    logit_clip: float
    ptr_scale: float
    att_scale: float
    o_ptr: int  # offset of the pointer key in the fused server projection
    o_end: int


class Steps(NamedTuple):
    """Per-step inputs (lists over UE positions; each entry (B, ...))."""

    srv_base: List[Tensor]  # (B,M,d) server + pair tokens
    q_base: List[Tensor]  # (B,d) UE token + prompt
    k_loc: List[Tensor]  # (B,1,d) pointer key of "local"
    ue_tok: List[Tensor]  # (B,d) UE token (decision-token base)
    amin: List[Tensor]  # (B,M) minimum shares, inf where impossible
    amin_ext: List[Tensor]  # (B,M+1) slot 0 = local (0), inf -> 0: the capacity a choice holds
    srv_static: List[Tensor]  # (B,M) server real and reachable
    local_real: List[Tensor]  # (B,) local meets the deadline and the UE is real
    reserved: List[Tensor]  # (B,M) capacity held for later must-offload UEs
    future: List[Tensor]  # (B,M) minimum shares the UEs after this one could use
    progress: List[Tensor]  # (B,) fraction of the UEs decided before this one
    lat_base: List[Tensor]  # (B,M) (upload + whole-server compute) / local latency
    sqrt_work_ext: List[Tensor]  # (B,M+1) sqrt(work) on each server, slot 0 (local) = 0
    local_lat: List[Tensor]  # (B,1) relative local latency (clamped away from 0)
    greedy_rows: Tensor  # (B,) bool: rows decided greedily inside a sampled pass
    uniform: List[Tensor]  # sampling noise (empty lists when greedy)
    normal: List[Tensor]
    accept: List[Tensor]


class Statics(NamedTuple):
    tok_table: Tensor  # (B,M+1,d) decision-token rows: [local target; server targets] + share bias
    ca_mask: Tensor  # (B*H,1,N+M)
    pool_w: Tensor  # (B,1,M) masked mean over real servers
    rem_ext: Tensor  # (B,M+1) capacity not held by minimum shares, slot 0 = local; updated in place
    load_ext: Tensor  # (B,M+1) sum of sqrt(work) of the UEs on each server; updated in place


def _attend(
    x: Tensor, w: LayerWeights, cache: LayerCache, ca_mask: Tensor, proj: Tensor, dims: Dims, i: int, o: int
) -> Tensor:
    """One decoder layer for one query row per instance: self-attention over slots <= i, cross-attention
    over [UE tokens; the step's server tokens], FFN."""
    b, m = proj.shape[0], proj.shape[1]
    d, h = dims.d, dims.h
    dh = d // h
    n_ca = cache.ca_v.shape[1]
    # One query per row: (B,1,d) is (B,H,1,dh) without a transpose, and back.
    q = F.linear(F.layer_norm(x, [d], w.ln_sa_w, w.ln_sa_b, w.ln_eps), w.sa_q_w, w.sa_q_b).view(b * h, 1, dh)
    sc = torch.bmm(q, cache.sa_kt[:, :, : i + 1]).mul_(dims.att_scale)
    att = torch.bmm(sc.softmax(-1), cache.sa_v[:, : i + 1])
    x = x + F.linear(att.view(b, 1, d), w.sa_out_w, w.sa_out_b)
    q = F.linear(F.layer_norm(x, [d], w.ln_ca_w, w.ln_ca_b, w.ln_eps), w.ca_q_w, w.ca_q_b).view(b * h, 1, dh)
    cache.ca_kt.view(b, h, dh, n_ca)[:, :, :, n_ca - m :] = proj[:, :, o : o + d].view(b, m, h, dh).permute(0, 2, 3, 1)
    cache.ca_v.view(b, h, n_ca, dh)[:, :, n_ca - m :] = proj[:, :, o + d : o + 2 * d].view(b, m, h, dh).transpose(1, 2)
    sc = torch.baddbmm(ca_mask, q, cache.ca_kt, alpha=dims.att_scale)
    if i > 0:  # the UEs decided so far are in the self-attention; cross-attention sees what remains
        sc[:, :, :i] = -1e9
    att = torch.bmm(sc.softmax(-1), cache.ca_v)
    x = x + F.linear(att.view(b, 1, d), w.ca_out_w, w.ca_out_b)
    y = F.gelu(F.linear(F.layer_norm(x, [d], w.ln_ff_w, w.ln_ff_b, w.ln_eps), w.ff1_w, w.ff1_b))
    return x + F.linear(y, w.ff2_w, w.ff2_b)


def _write_memory(tok: Tensor, w: LayerWeights, cache: LayerCache, dims: Dims, i: int) -> None:
    """Self-attention K/V of the decision token of UE i into slot i + 1."""
    b = tok.shape[0]
    d, h, n = dims.d, dims.h, dims.n
    dh = d // h
    kv = F.linear(F.layer_norm(tok, [d], w.ln_mem_w, w.ln_mem_b, w.ln_eps), w.sa_kv_w, w.sa_kv_b)  # (B,2d)
    cache.sa_kt.view(b, h, dh, n)[:, :, :, i + 1] = kv[:, :d].view(b, h, dh)
    cache.sa_v.view(b, h, n, dh)[:, :, i + 1] = kv[:, d:].view(b, h, dh)


def _dynamic_tokens(free: Tensor, load: Tensor, steps: Steps, i: int, w_dyn_b: Tensor, fit_scale: float):
    """Server tokens carrying the MEC state for UE i (same values as ``Decoder.dynamic_features``: an
    impossible pair has inf a_min, hence ratio 2 and slack -1); also which servers fit."""
    amin_i = steps.amin[i]
    fits = amin_i <= free * fit_scale
    ratio = torch.where(free > 0, amin_i / free.clamp_min(1e-12), 2.0).clamp_(0.0, 2.0)
    slack = (free - amin_i).clamp_(-1.0, 1.0)
    pressure = torch.log1p(steps.future[i] / free.clamp_min(1e-2)).clamp_(0.0, 6.0)
    progress = steps.progress[i].unsqueeze(1).expand_as(free)
    marginal = torch.log(steps.lat_base[i] + 2.0 * load * steps.sqrt_work_ext[i][:, 1:] / steps.local_lat[i]).clamp_(
        -5.0, 5.0
    )
    feat = torch.stack([free, ratio, fits.to(free.dtype), slack, pressure, progress, marginal], -1).float()
    return torch.baddbmm(steps.srv_base[i], feat, w_dyn_b), fits


def decode_loop(
    dims: Dims,
    head: HeadWeights,
    layers: List[LayerWeights],
    caches: List[LayerCache],
    steps: Steps,
    st: Statics,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decide every UE in position order. Returns logits (B,N,M+1), allowed (B,N,M+1), target (B,N),
    the clamped share fractions u (B,N) and the Beta concentrations (B,N,2)."""
    b, d = st.rem_ext.shape[0], dims.d
    rem_ext = st.rem_ext
    rem = rem_ext[:, 1:]  # view: updated in place with rem_ext
    load = st.load_ext[:, 1:]  # view
    w_dyn_b = head.w_dyn_t.expand(b, head.w_dyn_t.shape[0], d)
    logits_l: List[Tensor] = []
    allowed_l: List[Tensor] = []
    target_l: List[Tensor] = []
    u_l: List[Tensor] = []
    ab_l: List[Tensor] = []
    for i in range(dims.n):
        free = rem - steps.reserved[i]
        srv, fits = _dynamic_tokens(free, load, steps, i, w_dyn_b, dims.fit_scale)
        proj = F.linear(srv, head.w_srv, head.b_srv)  # (B,M,*)
        pooled = torch.bmm(st.pool_w, F.gelu(srv)).squeeze(1)
        x = (steps.q_base[i] + F.linear(pooled, head.w_state, head.b_state)).unsqueeze(1)  # (B,1,d)
        for li in range(len(layers)):
            x = _attend(x, layers[li], caches[li], st.ca_mask, proj, dims, i, 2 * d * li)
        gq = F.linear(F.layer_norm(x.squeeze(1), [d], head.w_on, head.b_on, head.eps_on), head.w_g, head.b_g)
        # Pointer head over [local; servers].
        keys = torch.cat([steps.k_loc[i], proj[:, :, dims.o_ptr : dims.o_end]], 1)  # (B,M+1,d)
        score = torch.bmm(keys, gq[:, :d].unsqueeze(2)).squeeze(2)
        srv_ok = steps.srv_static[i] & fits
        allowed = torch.cat([(steps.local_real[i] | ~srv_ok.any(-1)).unsqueeze(1), srv_ok], -1)
        logits = torch.where(allowed, dims.logit_clip * torch.tanh(score * dims.ptr_scale), -1e9)  # NEG
        if dims.greedy:
            t = logits.argmax(-1)
        else:
            t = categorical_from_uniform(torch.log_softmax(logits, -1), allowed, steps.uniform[i])
            t = torch.where(steps.greedy_rows, logits.argmax(-1), t)
        # Share head on the chosen server (server 1's token for "local": its share is 0 anyway).
        t1 = t.unsqueeze(1)
        chosen = torch.gather(srv, 1, (t1 - 1).clamp_min(0).unsqueeze(2).expand(b, 1, d)).squeeze(1)
        hidden = F.gelu(torch.addmm(gq[:, d:], chosen, head.w_sh_t))
        ab = F.softplus(F.linear(hidden, head.w_h2, head.b_h2)) + 1.0  # (B,2) Beta
        if dims.greedy:
            u = ab[:, 0] / ab.sum(-1)
        else:
            u = beta_from_noise(ab[:, 0], ab[:, 1], steps.normal[i], steps.accept[i]).float()
            u = torch.where(steps.greedy_rows, ab[:, 0] / ab.sum(-1), u)
        u = u.clamp(dims.share_eps, 1.0 - dims.share_eps)
        rem_ext.scatter_add_(1, t1, -torch.gather(steps.amin_ext[i], 1, t1))  # the minimum share is held
        st.load_ext.scatter_add_(1, t1, torch.gather(steps.sqrt_work_ext[i], 1, t1))
        logits_l.append(logits)
        allowed_l.append(allowed)
        target_l.append(t)
        u_l.append(u)
        ab_l.append(ab)
        if i + 1 < dims.n:
            row = torch.gather(st.tok_table, 1, t1.unsqueeze(2).expand(b, 1, d)).squeeze(1)
            tok = steps.ue_tok[i] + row + torch.where(t1 > 0, u.unsqueeze(1), 0.0) * head.w_share
            for li in range(len(layers)):
                _write_memory(tok, layers[li], caches[li], dims, i)
    return (
        torch.stack(logits_l, 1),
        torch.stack(allowed_l, 1),
        torch.stack(target_l, 1),
        torch.stack(u_l, 1),
        torch.stack(ab_l, 1),
    )


KERNELS = ("numba", "torchscript")
KERNEL_ENV = "LAMBO_DECODE_KERNEL"  # "numba", "torchscript" or unset (numba on a CPU when importable)


# The Numba kernel decodes a batch while rows x d_model^2 (its matrix work per step) is at most this;
# above it torch's batched ops win. Measured with one thread, N = 50: S (d = 64) numba / torch 33 / 59 ms
# at 32 rows, 62 / 87 at 64, 145 / 160 at 128, 299 / 274 at 256; M (d = 512) 133 / 154 ms at 1 row,
# 625 / 391 at 16.
NUMBA_MAX_WORK = 128 * 64 * 64


def kernel_for(device: torch.device, rows: int, width: int = 64) -> str:
    """Which step loop decodes ``rows`` rows of a ``width``-wide decoder (d_model) on ``device``: the Numba
    kernel on a CPU while per-op dispatch dominates (one N = 50 instance 17 -> 4 ms; S up to 128 rows, M
    up to two), TorchScript for more work, other devices or where Numba cannot be imported.
    ``LAMBO_DECODE_KERNEL`` forces one (``numba`` off a CPU still means TorchScript: the kernel reads
    host memory)."""
    choice = os.environ.get(KERNEL_ENV, "")
    if choice not in ("", *KERNELS):
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNELS)} (got {choice!r})")
    if choice == "torchscript" or device.type != "cpu" or (not choice and rows * width * width > NUMBA_MAX_WORK):
        return "torchscript"
    return "numba" if _numba_available() else "torchscript"


def _numba_available() -> bool:
    if not _NUMBA:
        try:
            import numba  # noqa: F401
        except ImportError:
            warnings.warn(
                "numba is not installed: decoding uses the slower TorchScript loop", RuntimeWarning, stacklevel=3
            )
            _NUMBA.append(False)
        else:
            _NUMBA.append(True)
    return _NUMBA[0]


_NUMBA: list = []  # [importable] once tried
_SCRIPTED_LOOP: list = []  # [compiled function] once tried; [None] when TorchScript is unavailable


def loop_fn():
    """The compiled step loop, or the plain Python function where TorchScript cannot compile it."""
    if not _SCRIPTED_LOOP:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _SCRIPTED_LOOP.append(torch.jit.script(decode_loop))
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function computes the same
            warnings.warn(
                f"TorchScript could not compile the decode loop ({type(err).__name__}: {err}); decoding runs eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            _SCRIPTED_LOOP.append(None)
    return _SCRIPTED_LOOP[0] or decode_loop


# ----------------------------------------------------------------------------------------------
# Building the loop's inputs from the model
# ----------------------------------------------------------------------------------------------
def layer_weights(layer: "DecoderLayer") -> LayerWeights:
    norms = (layer.norm_sa, layer.norm_ca, layer.norm_ff, layer.norm_mem)
    if len({nm.eps for nm in norms}) != 1:
        raise ValueError("decoder layer norms must share one eps")
    ff1, ff2 = layer.ffn[0], layer.ffn[-1]
    return LayerWeights(
        layer.norm_sa.weight, layer.norm_sa.bias, layer.sa_q.weight, layer.sa_q.bias,
        layer.sa_out.weight, layer.sa_out.bias, layer.norm_ca.weight, layer.norm_ca.bias,
        layer.ca_q.weight, layer.ca_q.bias, layer.ca_out.weight, layer.ca_out.bias,
        layer.norm_ff.weight, layer.norm_ff.bias, ff1.weight, ff1.bias, ff2.weight, ff2.bias,
        layer.norm_mem.weight, layer.norm_mem.bias, layer.sa_kv.weight, layer.sa_kv.bias,
        float(layer.norm_sa.eps),
    )  # fmt: skip


def head_weights(dec: "Decoder") -> HeadWeights:
    d = dec.cfg.d_model
    w1, b1 = dec.share_head[0].weight, dec.share_head[0].bias
    return HeadWeights(
        w_dyn_t=dec.dyn.weight.t(),
        w_state=dec.state.weight,
        b_state=dec.state.bias,
        w_srv=torch.cat([*(layer.ca_kv.weight for layer in dec.layers), dec.ptr_k.weight], 0),
        b_srv=torch.cat([*(layer.ca_kv.bias for layer in dec.layers), dec.ptr_k.bias]),
        w_g=torch.cat([dec.ptr_q.weight, w1[:, :d]], 0),
        b_g=torch.cat([dec.ptr_q.bias, b1]),
        w_sh_t=w1[:, d:].t(),
        w_h2=dec.share_head[2].weight,
        b_h2=dec.share_head[2].bias,
        w_on=dec.norm_out.weight,
        b_on=dec.norm_out.bias,
        w_share=dec.share_emb.weight[:, 0],
        eps_on=float(dec.norm_out.eps),
    )


def layer_caches(dec: "Decoder", enc: "Encoded") -> List[LayerCache]:
    """Cross-attention K/V [UE tokens; zeros for the servers] and the self-attention cache with BOS."""
    b, n, d = enc.ue.shape
    m, h = enc.server.shape[1], dec.cfg.n_heads
    dh = d // h
    bos = dec.bos.to(enc.ue.dtype).expand(b, 1, -1)
    out = []
    for layer in dec.layers:
        uk, uv = layer.ue_kv(enc.ue)  # (B,H,N,dh)
        ca_kt = torch.cat([uk.transpose(-1, -2), uk.new_zeros(b, h, dh, m)], 3).reshape(b * h, dh, n + m)
        ca_v = torch.cat([uv, uv.new_zeros(b, h, m, dh)], 2).reshape(b * h, n + m, dh)
        k0, v0 = layer.memory_kv(bos)  # (B,H,1,dh)
        k, v = k0.new_zeros(b, h, dh, n), v0.new_zeros(b, h, n, dh)
        k[..., :1], v[:, :, :1] = k0.transpose(-1, -2), v0
        out.append(LayerCache(ca_kt, ca_v, k.view(b * h, dh, n), v.view(b * h, n, dh)))
    return out


def step_tensors(policy: "LamboPolicy", batch: "PolicyBatch", enc: "Encoded"):
    """The per-step inputs stacked over positions, (B, N, ...) each, in :class:`Steps`' field order."""
    dec = policy.decoder
    # a_min: inf (unreachable, padded) stays inf, so "fits" and the dynamic features need no isfinite per
    # step; slot 0 of amin_ext stands for "local" (a_min = free = 0, so a local decision gets share 0).
    amin_full = torch.where(torch.isfinite(batch.amin), batch.amin, math.inf)
    amin_ext = F.pad(torch.where(torch.isfinite(amin_full), amin_full, 0.0), (1, 0))  # (B,N,M+1)
    srv_static = enc.server_mask[:, None, :] & batch.ue_mask[..., None] & torch.isfinite(amin_full)
    return {
        "srv_base": enc.server[:, None] + enc.pair + dec.dyn.bias,
        "q_base": enc.ue + enc.prompt[:, None],
        "k_loc": (dec.local_key + dec.local_ue(enc.ue))[:, :, None],
        "ue_tok": enc.ue,
        "amin": amin_full,
        "amin_ext": amin_ext,
        "srv_static": srv_static,
        "local_real": batch.local_ok & batch.ue_mask,
        "reserved": reserved_after(batch.reserve),
        "future": future_demand(batch.amin),
        "progress": policy.progress(batch),
        "lat_base": batch.lat_base,
        "sqrt_work_ext": F.pad(batch.sqrt_work, (1, 0)),
        "local_lat": batch.local_lat[..., None].clamp_min(1e-9),
    }


def step_inputs(policy: "LamboPolicy", batch: "PolicyBatch", enc: "Encoded", noise: Optional[DecodeNoise]) -> Steps:
    uniform = normal = accept = []
    greedy_rows = torch.zeros(batch.batch_size, dtype=torch.bool, device=batch.amin.device)
    if noise is not None:
        uniform, normal, accept = noise.uniform.unbind(1), noise.normal.unbind(1), noise.accept.unbind(1)
        if noise.greedy is not None:
            greedy_rows = noise.greedy
    per_step = {k: list(v.unbind(1)) for k, v in step_tensors(policy, batch, enc).items()}
    return Steps(**per_step, greedy_rows=greedy_rows, uniform=list(uniform), normal=list(normal), accept=list(accept))


def statics_and_dims(policy: "LamboPolicy", batch: "PolicyBatch", enc: "Encoded", greedy: bool) -> Tuple[Statics, Dims]:
    dec, cfg = policy.decoder, policy.cfg
    b = batch.batch_size
    d, h = cfg.d_model, cfg.n_heads
    dt = enc.ue.dtype
    smask = enc.server_mask.to(dt)
    ca_mask = torch.where(torch.cat([enc.ue_mask, enc.server_mask], 1), 0.0, NEG).to(dt)
    statics = Statics(
        tok_table=torch.cat([dec.local_target.to(dt).expand(b, 1, d), dec.server_target(enc.server)], 1)
        + dec.share_emb.bias,
        ca_mask=ca_mask[:, None, None, :],  # (B,1,1,N+M): expanded over heads by the caller that needs it
        pool_w=(smask / smask.sum(1, keepdim=True).clamp_min(1.0))[:, None, :],
        rem_ext=F.pad(torch.where(batch.server_mask, 1.0, 0.0).to(torch.float64), (1, 0)),
        load_ext=torch.zeros(b, batch.m_max + 1, dtype=torch.float64, device=batch.amin.device),
    )
    o_ptr = 2 * d * len(dec.layers)
    dims = Dims(
        n=batch.n_max, d=d, h=h, greedy=greedy, share_eps=float(cfg.share_eps),
        fit_scale=1.0 + FIT_RTOL, logit_clip=float(cfg.logit_clip), ptr_scale=1.0 / math.sqrt(d),
        att_scale=1.0 / math.sqrt(d // h), o_ptr=o_ptr, o_end=o_ptr + d,
    )  # fmt: skip
    return statics, dims


def run(policy: "LamboPolicy", batch: "PolicyBatch", enc: "Encoded", noise: Optional[DecodeNoise]):
    """Everything the step loop needs, computed once, then the loop: the Numba CPU kernel on a CPU
    (:mod:`lambo_ray.policy.cpu_kernel`), else the TorchScript-compiled :func:`decode_loop`."""
    if kernel_for(enc.ue.device, batch.batch_size, policy.cfg.d_model) == "numba":
        from lambo_ray.policy import cpu_kernel

        return cpu_kernel.run(policy, batch, enc, noise)
    statics, dims = statics_and_dims(policy, batch, enc, noise is None)
    b, h, n_ca = batch.batch_size, dims.h, statics.ca_mask.shape[-1]
    statics = statics._replace(ca_mask=statics.ca_mask.expand(b, h, 1, n_ca).reshape(b * h, 1, n_ca))
    return loop_fn()(
        dims,
        head_weights(policy.decoder),
        [layer_weights(layer) for layer in policy.decoder.layers],
        layer_caches(policy.decoder, enc),
        step_inputs(policy, batch, enc, noise),
        statics,
    )
