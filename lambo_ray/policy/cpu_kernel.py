"""The decoder's step loop as one Numba-compiled CPU kernel.

Why a second implementation of :func:`lambo_ray.policy.fast_decode.decode_loop`: on a CPU at serving
batch sizes (one instance, or one instance's greedy row plus a few samples) the TorchScript loop costs
~200 us per UE, almost all of it per-op dispatch (~100 aten ops per step, a few microseconds each),
so one N = 50 decision took ~10 ms of decoding while its arithmetic is ~0.1 MFLOP per step. Compiled
to machine code the same step is tens of microseconds, which is what lets ``search`` (policy samples
plus local search) stay a small fraction of DE's time. The TorchScript loop stays for every other
device (a GPU) and as the fallback where Numba is missing.

It computes the same thing as ``decode_loop`` from the same prepared inputs (laid out step-major here:
``(N, B, ...)``, so a step's slice is contiguous), matrix products through BLAS (``np.dot`` on float32),
attention, norms and the heads in plain loops; float32 where the torch loop is float32, float64 for the
MEC state. Tests pin it to the straightforward reference decoder like the TorchScript loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from lambo_ray.policy.fast_decode import (
    LayerWeights,
    head_weights,
    layer_caches,
    layer_weights,
    statics_and_dims,
    step_tensors,
)
from lambo_ray.policy.features import PolicyBatch
from lambo_ray.policy.model import Encoded, LamboPolicy
from lambo_ray.policy.sampling import DecodeNoise

NEG = np.float32(-1e9)
# Reassociation (vectorised reductions) and fused multiply-adds, but not "no NaN / no inf": impossible
# pairs carry a_min = inf and the comparisons on them must stay exact.
FAST = {"reassoc", "contract", "nsz", "arcp"}
SQRT1_2 = 0.7071067811865476


@njit(cache=True, fastmath=FAST, inline="always")
def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x * SQRT1_2))


@njit(cache=True, fastmath=FAST)
def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    rows, d = x.shape
    out = np.empty_like(x)
    for r in range(rows):
        mean = 0.0
        for k in range(d):
            mean += x[r, k]
        mean /= d
        var = 0.0
        for k in range(d):
            var += (x[r, k] - mean) ** 2
        inv = 1.0 / math.sqrt(var / d + eps)
        for k in range(d):
            out[r, k] = (x[r, k] - mean) * inv * w[k] + b[k]
    return out


@njit(cache=True, fastmath=FAST)
def _affine(x: np.ndarray, w_t: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.dot(x, w_t)
    out += b
    return out


@njit(cache=True, fastmath=FAST)
def _dot_scores(q: np.ndarray, keys: np.ndarray, scale: float, scores: np.ndarray, top: float) -> float:
    """scores[s] += scale * q . keys[s]; returns the running maximum."""
    for s in range(keys.shape[0]):
        acc = 0.0
        for k in range(keys.shape[1]):
            acc += q[k] * keys[s, k]
        scores[s] += scale * acc
        if scores[s] > top:
            top = scores[s]
    return top


@njit(cache=True, fastmath=FAST)
def _weighted_sum(scores: np.ndarray, top: float, vals: np.ndarray, out: np.ndarray, total: float) -> float:
    """out += exp(scores - top) @ vals; returns the running normaliser."""
    for s in range(vals.shape[0]):
        p = math.exp(scores[s] - top)
        total += p
        for k in range(vals.shape[1]):
            out[k] += p * vals[s, k]
    return total


@njit(cache=True, fastmath=FAST)
def _attend(q, k1, v1, k2, v2, scale, sc1, sc2, out) -> None:
    """Softmax attention of one head's query over two key/value blocks (the second may be empty);
    ``sc1``/``sc2`` hold each block's additive mask on entry."""
    top = _dot_scores(q, k1, scale, sc1, -np.inf)
    top = _dot_scores(q, k2, scale, sc2, top)
    acc = np.zeros(out.shape[0])
    total = _weighted_sum(sc1, top, v1, acc, 0.0)
    total = _weighted_sum(sc2, top, v2, acc, total)
    for k in range(out.shape[0]):
        out[k] = acc[k] / total


@njit(cache=True, fastmath=FAST)
def _categorical(logits: np.ndarray, allowed: np.ndarray, u: float) -> int:
    """Inverse-CDF draw of the masked categorical (as ``sampling.categorical_from_uniform``)."""
    q = logits.shape[0]
    top = -np.inf
    for j in range(q):
        if logits[j] > top:
            top = logits[j]
    lse = 0.0
    for j in range(q):
        lse += math.exp(logits[j] - top)
    lse = top + math.log(lse)
    cdf = np.empty(q)
    acc = 0.0
    for j in range(q):
        if allowed[j]:
            acc += math.exp(np.float32(logits[j] - lse))
        cdf[j] = acc
    idx = 0
    for j in range(q):
        if cdf[j] <= u * cdf[q - 1]:
            idx += 1
    last, first = 0, -1
    for j in range(q):
        if allowed[j]:
            last = j
            if first < 0:
                first = j
    idx = min(idx, last)
    if not allowed[idx]:
        idx = max(first, 0)
    return idx


@njit(cache=True, fastmath=FAST)
def _gamma(alpha: float, normal: np.ndarray, accept: np.ndarray) -> float:
    """Marsaglia-Tsang Gamma(alpha) from pre-drawn proposals (as ``sampling.gamma_from_noise``)."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    for k in range(normal.shape[0]):
        v = (1.0 + c * normal[k]) ** 3
        if v > 0 and math.log(accept[k]) < 0.5 * normal[k] ** 2 + d - d * v + d * math.log(v):
            return d * v
    return d


@njit(cache=True, fastmath=FAST)
def decode_kernel(
    greedy, d, h, share_eps, fit_scale, logit_clip, ptr_scale, att_scale,
    srv_base, q_base, k_loc, ue_tok, amin, amin_ext, srv_static, local_real, reserved, future, progress,
    lat_base, sqrt_work_ext, local_lat, greedy_rows, uniform, normal, accept,
    tok_table, ca_mask, pool_w, rem_ext, load_ext,
    ue_k, ue_v, mem_k, mem_v,
    ln_sa_w, ln_sa_b, sa_q_wt, sa_q_b, sa_out_wt, sa_out_b, ln_ca_w, ln_ca_b, ca_q_wt, ca_q_b,
    ca_out_wt, ca_out_b, ln_ff_w, ln_ff_b, ff1_wt, ff1_b, ff2_wt, ff2_b, ln_mem_w, ln_mem_b, sa_kv_wt, sa_kv_b,
    ln_eps, w_dyn, w_state_t, b_state, w_srv_t, b_srv, w_g_t, b_g, w_sh_t, w_h2_t, b_h2, w_on, b_on, w_share,
    eps_on,
):  # fmt: skip
    """Decide every UE in position order (see ``fast_decode.decode_loop``). Per-step inputs are
    step-major (N, B, ...); ``mem_k``/``mem_v`` (L, B, H, N, dh) hold BOS in slot 0 and are filled here.
    Returns logits (B,N,M+1), allowed (B,N,M+1), target (B,N), u (B,N) and Beta concentrations (B,N,2)."""
    n, b, m = amin.shape
    n_layers = ln_sa_w.shape[0]
    dh = d // h
    n_ue = ue_k.shape[3]
    logits_out = np.empty((b, n, m + 1), np.float32)
    allowed_out = np.empty((b, n, m + 1), np.bool_)
    target_out = np.empty((b, n), np.int64)
    u_out = np.empty((b, n), np.float32)
    ab_out = np.empty((b, n, 2), np.float32)
    feat = np.empty((b * m, 7), np.float32)
    fits = np.empty((b, m), np.bool_)
    att = np.empty((b, d), np.float32)
    sa_scores = np.empty(n)
    ca_scores = np.empty(n_ue + m)
    no_kv = np.empty((0, dh), np.float32)
    pooled = np.empty((b, d), np.float32)
    tok = np.empty((b, d), np.float32)
    for i in range(n):
        # Dynamic server tokens (Decoder.dynamic_features) and which servers fit.
        for r in range(b):
            for j in range(m):
                free = rem_ext[r, j + 1] - reserved[i, r, j]
                a = amin[i, r, j]
                fits[r, j] = a <= free * fit_scale
                ratio = min(max(a / max(free, 1e-12), 0.0), 2.0) if free > 0 else 2.0
                marginal = math.log(
                    lat_base[i, r, j] + 2.0 * load_ext[r, j + 1] * sqrt_work_ext[i, r, j + 1] / local_lat[i, r]
                )
                row = r * m + j
                feat[row, 0] = free
                feat[row, 1] = ratio
                feat[row, 2] = 1.0 if fits[r, j] else 0.0
                feat[row, 3] = min(max(free - a, -1.0), 1.0)
                feat[row, 4] = min(max(math.log1p(future[i, r, j] / max(free, 1e-2)), 0.0), 6.0)
                feat[row, 5] = progress[i, r]
                feat[row, 6] = min(max(marginal, -5.0), 5.0)
        srv = srv_base[i].reshape(b * m, d) + np.dot(feat, w_dyn)
        proj = _affine(srv, w_srv_t, b_srv)
        for r in range(b):
            for k in range(d):
                acc = 0.0
                for j in range(m):
                    acc += pool_w[r, j] * _gelu(srv[r * m + j, k])
                pooled[r, k] = acc
        x = q_base[i] + _affine(pooled, w_state_t, b_state)
        for li in range(n_layers):
            q = _affine(_layer_norm(x, ln_sa_w[li], ln_sa_b[li], ln_eps), sa_q_wt[li], sa_q_b[li])
            for r in range(b):
                for hh in range(h):
                    heads = slice(hh * dh, (hh + 1) * dh)
                    sa_scores[: i + 1] = 0.0
                    _attend(
                        q[r, heads], mem_k[li, r, hh, : i + 1], mem_v[li, r, hh, : i + 1], no_kv, no_kv,
                        att_scale, sa_scores[: i + 1], sa_scores[:0], att[r, heads],
                    )  # fmt: skip
            x = x + _affine(att, sa_out_wt[li], sa_out_b[li])
            q = _affine(_layer_norm(x, ln_ca_w[li], ln_ca_b[li], ln_eps), ca_q_wt[li], ca_q_b[li])
            o = 2 * d * li
            # Cross-attention over the UEs not decided yet (the torch loop's scores of UEs < i are
            # -1e9: exactly zero weight) and the step's server tokens.
            for r in range(b):
                srv_rows = proj[r * m : (r + 1) * m]
                for hh in range(h):
                    heads = slice(hh * dh, (hh + 1) * dh)
                    srv_k = srv_rows[:, o + hh * dh : o + (hh + 1) * dh]
                    srv_v = srv_rows[:, o + d + hh * dh : o + d + (hh + 1) * dh]
                    ue_sc, srv_sc = ca_scores[: n_ue - i], ca_scores[n_ue - i : n_ue - i + m]
                    ue_sc[:] = ca_mask[r, i:n_ue]
                    srv_sc[:] = ca_mask[r, n_ue:]
                    _attend(
                        q[r, heads], ue_k[li, r, hh, i:], ue_v[li, r, hh, i:], srv_k, srv_v, att_scale, ue_sc, srv_sc,
                        att[r, heads],
                    )  # fmt: skip
            x = x + _affine(att, ca_out_wt[li], ca_out_b[li])
            y = _affine(_layer_norm(x, ln_ff_w[li], ln_ff_b[li], ln_eps), ff1_wt[li], ff1_b[li])
            for r in range(y.shape[0]):
                for k in range(y.shape[1]):
                    y[r, k] = _gelu(y[r, k])
            x = x + _affine(y, ff2_wt[li], ff2_b[li])
        gq = _affine(_layer_norm(x, w_on, b_on, eps_on), w_g_t, b_g)
        o_ptr = 2 * d * n_layers
        for r in range(b):
            logits = logits_out[r, i]
            allowed = allowed_out[r, i]
            any_ok = False
            for j in range(m):
                allowed[j + 1] = srv_static[i, r, j] and fits[r, j]
                any_ok = any_ok or allowed[j + 1]
            allowed[0] = local_real[i, r] or not any_ok
            for j in range(m + 1):
                acc = 0.0
                for k in range(d):
                    key = k_loc[i, r, k] if j == 0 else proj[r * m + j - 1, o_ptr + k]
                    acc += key * gq[r, k]
                logits[j] = np.float32(logit_clip * math.tanh(np.float32(acc) * ptr_scale)) if allowed[j] else NEG
            if greedy or greedy_rows[r]:
                t = int(np.argmax(logits))
            else:
                t = _categorical(logits, allowed, uniform[i, r])
            chosen = srv[r * m + max(t - 1, 0)]
            hidden = gq[r, d:] + np.dot(chosen, w_sh_t)
            for k in range(hidden.shape[0]):
                hidden[k] = _gelu(hidden[k])
            raw = np.dot(hidden, w_h2_t) + b_h2
            for c in range(2):
                z = raw[c]
                ab_out[r, i, c] = (z if z > 20.0 else math.log1p(math.exp(z))) + 1.0
            alpha, beta = ab_out[r, i, 0], ab_out[r, i, 1]
            if greedy or greedy_rows[r]:
                u = np.float32(alpha / (alpha + beta))
            else:
                x_g = _gamma(alpha, normal[i, r, 0], accept[i, r, 0])
                y_g = _gamma(beta, normal[i, r, 1], accept[i, r, 1])
                u = np.float32(x_g / (x_g + y_g))
            u_out[r, i] = min(max(u, np.float32(share_eps)), np.float32(1.0 - share_eps))
            target_out[r, i] = t
            rem_ext[r, t] -= amin_ext[i, r, t]
            load_ext[r, t] += sqrt_work_ext[i, r, t]
            if i + 1 < n:
                s_share = u_out[r, i] if t > 0 else np.float32(0.0)
                for k in range(d):
                    tok[r, k] = ue_tok[i, r, k] + tok_table[r, t, k] + s_share * w_share[k]
        if i + 1 < n:
            for li in range(n_layers):
                kv = _affine(_layer_norm(tok, ln_mem_w[li], ln_mem_b[li], ln_eps), sa_kv_wt[li], sa_kv_b[li])
                for r in range(b):
                    for hh in range(h):
                        mem_k[li, r, hh, i + 1] = kv[r, hh * dh : (hh + 1) * dh]
                        mem_v[li, r, hh, i + 1] = kv[r, d + hh * dh : d + (hh + 1) * dh]
    return logits_out, allowed_out, target_out, u_out, ab_out


# ----------------------------------------------------------------------------------------------
# From the model to the kernel's arrays
# ----------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


def _step_major(t: torch.Tensor) -> np.ndarray:
    return _np(t.transpose(0, 1))


def _layer_arrays(policy: LamboPolicy) -> list[np.ndarray]:
    """Layer weights stacked over layers, matrices transposed to (in, out), in the kernel's order."""
    ws = [layer_weights(layer) for layer in policy.decoder.layers]
    out = []
    for name in LayerWeights._fields[:-1]:
        stacked = torch.stack([getattr(w, name) for w in ws])
        out.append(_np(stacked.transpose(1, 2) if stacked.dim() == 3 else stacked))
    return out


def _head_arrays(policy: LamboPolicy) -> list[np.ndarray]:
    hw = head_weights(policy.decoder)
    return [
        _np(hw.w_dyn_t), _np(hw.w_state.t()), _np(hw.b_state), _np(hw.w_srv.t()), _np(hw.b_srv),
        _np(hw.w_g.t()), _np(hw.b_g), _np(hw.w_sh_t), _np(hw.w_h2.t()), _np(hw.b_h2), _np(hw.w_on),
        _np(hw.b_on), _np(hw.w_share),
    ]  # fmt: skip


def run(policy: LamboPolicy, batch: PolicyBatch, enc: Encoded, noise: DecodeNoise | None):
    """``fast_decode.run``'s contract (logits, allowed, target, u, Beta concentrations as tensors) on
    the Numba kernel."""
    statics, dims = statics_and_dims(policy, batch, enc, noise is None)
    steps = [  # the network's tokens in float32, the MEC state in float64 (as the torch loop computes it)
        _step_major(t.float() if idx < 4 else t.double() if t.is_floating_point() else t)
        for idx, t in enumerate(step_tensors(policy, batch, enc, noise).values())
    ]
    steps[2] = steps[2][:, :, 0]  # k_loc (N,B,1,d) -> (N,B,d)
    steps[-1] = steps[-1][:, :, 0]  # local_lat (N,B,1) -> (N,B)
    b, n, h = batch.batch_size, batch.n_max, dims.h
    if noise is None:
        greedy_rows = np.zeros(b, np.bool_)
        uniform, normal, accept = np.zeros((n, b)), np.zeros((n, b, 2, 1)), np.ones((n, b, 2, 1))
    else:
        greedy_rows = np.zeros(b, np.bool_) if noise.greedy is None else _np(noise.greedy)
        uniform, normal, accept = (_step_major(t.double()) for t in (noise.uniform, noise.normal, noise.accept))
    caches = layer_caches(policy.decoder, enc)
    dh = dims.d // h
    n_ca = caches[0].ca_v.shape[1]
    ue_k = _np(torch.stack([c.ca_kt.view(b, h, dh, n_ca)[..., :n].transpose(-1, -2) for c in caches]))
    ue_v = _np(torch.stack([c.ca_v.view(b, h, n_ca, dh)[:, :, :n] for c in caches]))
    mem_k = _np(torch.stack([c.sa_kt.view(b, h, dh, n).transpose(-1, -2) for c in caches]))
    mem_v = _np(torch.stack([c.sa_v.view(b, h, n, dh) for c in caches]))
    layer_eps = float(policy.decoder.layers[0].norm_sa.eps)
    out = decode_kernel(
        dims.greedy, dims.d, h, dims.share_eps, dims.fit_scale, dims.logit_clip, dims.ptr_scale, dims.att_scale,
        *steps, greedy_rows, uniform, normal, accept,
        _np(statics.tok_table), _np(statics.ca_mask[:, 0, 0]), _np(statics.pool_w[:, 0]),
        _np(statics.rem_ext), _np(statics.load_ext),
        ue_k, ue_v, mem_k, mem_v,
        *_layer_arrays(policy), layer_eps, *_head_arrays(policy), float(policy.decoder.norm_out.eps),
    )  # fmt: skip
    return tuple(torch.from_numpy(a).to(enc.ue.device) for a in out)
