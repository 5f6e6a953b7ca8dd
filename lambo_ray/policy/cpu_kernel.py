"""The decoder's step loop as one Numba-compiled CPU kernel.

Why a second implementation of :func:`lambo_ray.policy.fast_decode.decode_loop`: on a CPU at serving
batch sizes (one instance, or one instance's greedy row plus a few samples) the TorchScript loop costs
~200 us per UE, almost all of it per-op dispatch (~100 aten ops per step, a few microseconds each),
so one N = 50 decision took ~10 ms of decoding while its arithmetic is ~0.1 MFLOP per step. Compiled
to machine code the same step is tens of microseconds, which is what lets ``search`` (policy samples
plus local search) stay a small fraction of DE's time. The TorchScript loop stays for larger work
(``fast_decode.NUMBA_MAX_WORK``: rows x width^2, where batched torch ops win), for other devices (a
GPU) and as the fallback where Numba is missing (``fast_decode.kernel_for`` chooses).

It computes the same thing as ``decode_loop`` from the same prepared inputs (laid out step-major here:
``(N, B, ...)``, so a step's slice is contiguous), matrix products through BLAS (``np.dot`` on float32),
attention, norms and the heads in plain loops; float32 where the torch loop is float32, float64 for the
MEC state. Tests pin it to the straightforward reference decoder like the TorchScript loop.
"""

from __future__ import annotations

import math
import weakref

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
# _erf32's coefficients, highest power first: numerator in x^2 (times x), denominator in x^2.
ERF_NUM = (
    np.float32(-2.72614225801306e-10), np.float32(2.77068142495902e-08), np.float32(-2.10102402082508e-06),
    np.float32(-5.69250639462346e-05), np.float32(-7.34990630326855e-04), np.float32(-2.95459980854025e-03),
    np.float32(-1.60960333262415e-02),
)  # fmt: skip
ERF_DEN = (
    np.float32(-1.45660718464996e-05), np.float32(-2.13374055278905e-04), np.float32(-1.68282697438203e-03),
    np.float32(-7.37332916720468e-03), np.float32(-1.42647390514189e-02),
)  # fmt: skip


@njit(cache=True, fastmath=FAST, inline="always")
def _erf32(x: float) -> float:
    """erf in float32 as a rational function of x^2 (a minimax fit of the kind Eigen uses; within 6 ulp
    of the exact value on a dense grid, tested). libm's double ``erf`` costs ~25 ns a call and a decoder
    step makes ~580 of them per row (server pooling, the FFN, the share head); this one is a few
    multiply-adds (~4 ns) that vectorise: decoding 1.1-1.2x faster at batches up to 16."""
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = q = np.float32(0.0)  # Horner from zero: the first step gives the leading coefficient exactly
    for c in ERF_NUM:
        p = p * x2 + c
    for c in ERF_DEN:
        q = q * x2 + c
    return x * p / q


@njit(cache=True, fastmath=FAST, inline="always")
def _gelu(x: float) -> float:
    return np.float32(0.5) * x * (np.float32(1.0) + _erf32(x * np.float32(SQRT1_2)))


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
def _server_tokens(i, steps, rem_ext, load_ext, fit_scale, w_dyn, feat, fits):
    """The step's server tokens (``Decoder.dynamic_features`` on the MEC state) and which servers fit."""
    srv_base, amin = steps[0], steps[4]
    reserved, future, progress, lat_base, sqrt_work_ext, local_lat = steps[8:14]
    b, m, d = srv_base.shape[1], srv_base.shape[2], srv_base.shape[3]
    for r in range(b):
        for j in range(m):
            free = rem_ext[r, j + 1] - reserved[i, r, j]
            a = amin[i, r, j]
            fits[r, j] = a <= free * fit_scale
            load_term = 2.0 * load_ext[r, j + 1] * sqrt_work_ext[i, r, j + 1] / local_lat[i, r]
            row = r * m + j
            feat[row, 0] = free
            feat[row, 1] = min(max(a / max(free, 1e-12), 0.0), 2.0) if free > 0 else 2.0
            feat[row, 2] = 1.0 if fits[r, j] else 0.0
            feat[row, 3] = min(max(free - a, -1.0), 1.0)
            feat[row, 4] = min(max(math.log1p(future[i, r, j] / max(free, 1e-2)), 0.0), 6.0)
            feat[row, 5] = progress[i, r]
            feat[row, 6] = min(max(math.log(lat_base[i, r, j] + load_term), -5.0), 5.0)
    return srv_base[i].reshape(b * m, d) + np.dot(feat, w_dyn)


@njit(cache=True, fastmath=FAST)
def _query(i, srv, pool_w, q_base, w_state_t, b_state):
    """The step's query: UE token + prompt + the MEC state (mean of the GELU'd server tokens)."""
    b, m = pool_w.shape
    d = srv.shape[1]
    pooled = np.empty((b, d), np.float32)
    for r in range(b):
        for k in range(d):
            acc = 0.0
            for j in range(m):
                acc += pool_w[r, j] * _gelu(srv[r * m + j, k])
            pooled[r, k] = acc
    return q_base[i] + _affine(pooled, w_state_t, b_state)


@njit(cache=True, fastmath=FAST)
def _layer(li, i, x, proj, ca_mask, caches, lw, h, att_scale, ln_eps):
    """One decoder layer for the step's query rows (``fast_decode._attend``)."""
    ue_k, ue_v, mem_k, mem_v = caches
    b, d = x.shape
    dh = d // h
    m = proj.shape[0] // b
    n_ue = ue_k.shape[3]
    att = np.empty((b, d), np.float32)
    scores = np.empty(n_ue + m)
    no_kv = np.empty((0, dh), np.float32)
    q = _affine(_layer_norm(x, lw[0][li], lw[1][li], ln_eps), lw[2][li], lw[3][li])
    for r in range(b):  # self-attention over BOS and the decisions so far
        for hh in range(h):
            heads = slice(hh * dh, (hh + 1) * dh)
            sc = scores[: i + 1]
            sc[:] = 0.0
            kv = (mem_k[li, r, hh, : i + 1], mem_v[li, r, hh, : i + 1])
            _attend(q[r, heads], kv[0], kv[1], no_kv, no_kv, att_scale, sc, scores[:0], att[r, heads])
    x = x + _affine(att, lw[4][li], lw[5][li])
    q = _affine(_layer_norm(x, lw[6][li], lw[7][li], ln_eps), lw[8][li], lw[9][li])
    o = 2 * d * li
    # Cross-attention over the UEs not decided yet (the torch loop gives UEs < i a score of -1e9:
    # exactly zero weight) and the step's server tokens.
    for r in range(b):
        srv_rows = proj[r * m : (r + 1) * m]
        for hh in range(h):
            heads = slice(hh * dh, (hh + 1) * dh)
            ue_sc, srv_sc = scores[: n_ue - i], scores[n_ue - i : n_ue - i + m]
            ue_sc[:] = ca_mask[r, i:n_ue]
            srv_sc[:] = ca_mask[r, n_ue:]
            srv_k = srv_rows[:, o + hh * dh : o + (hh + 1) * dh]
            srv_v = srv_rows[:, o + d + hh * dh : o + d + (hh + 1) * dh]
            ue_kv = (ue_k[li, r, hh, i:], ue_v[li, r, hh, i:])
            _attend(q[r, heads], ue_kv[0], ue_kv[1], srv_k, srv_v, att_scale, ue_sc, srv_sc, att[r, heads])
    x = x + _affine(att, lw[10][li], lw[11][li])
    y = _affine(_layer_norm(x, lw[12][li], lw[13][li], ln_eps), lw[14][li], lw[15][li])
    for r in range(b):
        for k in range(y.shape[1]):
            y[r, k] = _gelu(y[r, k])
    return x + _affine(y, lw[16][li], lw[17][li])


@njit(cache=True, fastmath=FAST)
def _decide_row(r, i, gq, srv, proj, fits, steps, noise, hw, dims, out):
    """Pointer head over [local; servers], then the share head on the chosen server: (target, u);
    the row's logits, allowed options and Beta concentrations go into ``out``."""
    logits, allowed, ab = out[0][r, i], out[1][r, i], out[4][r, i]
    greedy, d, _, share_eps, _, logit_clip, ptr_scale, _, _, _ = dims
    k_loc, srv_static, local_real = steps[2], steps[6], steps[7]
    greedy_rows, uniform, normal, accept = noise
    m = fits.shape[1]
    o_ptr = proj.shape[1] - d
    any_ok = False
    for j in range(m):
        allowed[j + 1] = srv_static[i, r, j] and fits[r, j]
        any_ok = any_ok or allowed[j + 1]
    allowed[0] = local_real[i, r] or not any_ok
    for j in range(m + 1):
        acc = 0.0
        for k in range(d):
            acc += (k_loc[i, r, k] if j == 0 else proj[r * m + j - 1, o_ptr + k]) * gq[r, k]
        logits[j] = np.float32(logit_clip * math.tanh(np.float32(acc) * ptr_scale)) if allowed[j] else NEG
    sampled = not (greedy or greedy_rows[r])
    t = _categorical(logits, allowed, uniform[i, r]) if sampled else int(np.argmax(logits))
    hidden = gq[r, d:] + np.dot(srv[r * m + max(t - 1, 0)], hw[7])
    for k in range(hidden.shape[0]):
        hidden[k] = _gelu(hidden[k])
    raw = np.dot(hidden, hw[8]) + hw[9]
    for c in range(2):
        ab[c] = (raw[c] if raw[c] > 20.0 else math.log1p(math.exp(raw[c]))) + 1.0
    if sampled:
        x_g = _gamma(ab[0], normal[i, r, 0], accept[i, r, 0])
        u = np.float32(x_g / (x_g + _gamma(ab[1], normal[i, r, 1], accept[i, r, 1])))
    else:
        u = np.float32(ab[0] / (ab[0] + ab[1]))
    return t, min(max(u, np.float32(share_eps)), np.float32(1.0 - share_eps))


@njit(cache=True, fastmath=FAST)
def _write_memory(i, tok, caches, lw, h, ln_eps):
    """Self-attention K/V of the decision tokens of position i into slot i + 1 of every layer."""
    mem_k, mem_v = caches[2], caches[3]
    b, d = tok.shape
    dh = d // h
    for li in range(mem_k.shape[0]):
        kv = _affine(_layer_norm(tok, lw[18][li], lw[19][li], ln_eps), lw[20][li], lw[21][li])
        for r in range(b):
            for hh in range(h):
                mem_k[li, r, hh, i + 1] = kv[r, hh * dh : (hh + 1) * dh]
                mem_v[li, r, hh, i + 1] = kv[r, d + hh * dh : d + (hh + 1) * dh]


@njit(cache=True, fastmath=FAST)
def decode_kernel(dims, steps, noise, statics, caches, lw, hw):
    """Decide every UE in position order (see ``fast_decode.decode_loop``). ``dims``: greedy, d, h,
    share_eps, fit_scale, logit_clip, ptr_scale, att_scale, layer-norm eps, output-norm eps; ``steps``:
    ``fast_decode.step_tensors`` step-major (N, B, ...); ``noise``: greedy rows, uniform, normal,
    accept; ``statics``: decision-token table, cross-attention mask, pooling weights, remaining
    capacity and load (updated here); ``caches``: UE K/V and the self-attention K/V (L, B, H, N, dh,
    BOS in slot 0, filled here); ``lw``/``hw``: layer and head weights (``_layer_arrays``,
    ``_head_arrays``). Returns logits (B,N,M+1), allowed (B,N,M+1), target (B,N), u (B,N), Beta
    concentrations (B,N,2)."""
    h, fit_scale, att_scale, ln_eps, eps_on = dims[2], dims[4], dims[7], dims[8], dims[9]
    tok_table, ca_mask, pool_w, rem_ext, load_ext = statics
    amin_ext, sqrt_work_ext, ue_tok = steps[5], steps[12], steps[3]
    n, b, m = steps[4].shape
    d = dims[1]
    out = (
        np.empty((b, n, m + 1), np.float32),
        np.empty((b, n, m + 1), np.bool_),
        np.empty((b, n), np.int64),
        np.empty((b, n), np.float32),
        np.empty((b, n, 2), np.float32),
    )
    feat = np.empty((b * m, 7), np.float32)
    fits = np.empty((b, m), np.bool_)
    tok = np.empty((b, d), np.float32)
    for i in range(n):
        srv = _server_tokens(i, steps, rem_ext, load_ext, fit_scale, hw[0], feat, fits)
        proj = _affine(srv, hw[3], hw[4])
        x = _query(i, srv, pool_w, steps[1], hw[1], hw[2])
        for li in range(lw[0].shape[0]):
            x = _layer(li, i, x, proj, ca_mask, caches, lw, h, att_scale, ln_eps)
        gq = _affine(_layer_norm(x, hw[10], hw[11], eps_on), hw[5], hw[6])
        for r in range(b):
            t, u = _decide_row(r, i, gq, srv, proj, fits, steps, noise, hw, dims, out)
            out[2][r, i], out[3][r, i] = t, u
            rem_ext[r, t] -= amin_ext[i, r, t]
            load_ext[r, t] += sqrt_work_ext[i, r, t]
            s_share = u if t > 0 else np.float32(0.0)
            for k in range(d):
                tok[r, k] = ue_tok[i, r, k] + tok_table[r, t, k] + s_share * hw[12][k]
        if i + 1 < n:
            _write_memory(i, tok, caches, lw, h, ln_eps)
    return out


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
    """``decode_kernel``'s ``hw``: 0 dynamic-feature weights, 1-2 MEC-state query, 3-4 fused server
    projection, 5-6 fused output projection, 7 share head (chosen-server half), 8-9 share head output,
    10-11 output norm, 12 share embedding; matrices transposed to (in, out)."""
    hw = head_weights(policy.decoder)
    return [
        _np(hw.w_dyn_t), _np(hw.w_state.t()), _np(hw.b_state), _np(hw.w_srv.t()), _np(hw.b_srv),
        _np(hw.w_g.t()), _np(hw.b_g), _np(hw.w_sh_t), _np(hw.w_h2.t()), _np(hw.b_h2), _np(hw.w_on),
        _np(hw.b_on), _np(hw.w_share),
    ]  # fmt: skip


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weight_arrays(policy: LamboPolicy) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The kernel's layer and head weights, converted once per state of the decoder's parameters.

    Converting them is ~40 small tensor ops, about a third of a one-instance decode outside the kernel.
    Every in-place change of a parameter (an optimiser step, ``load_state_dict``) bumps its version
    counter and a new tensor has new storage, so either invalidates the cached arrays. Inference
    tensors (Serve's decoder views are loaded under inference mode) have no version counter; they can
    only be changed in place inside inference mode, which nothing here does, so their storage is the key."""
    key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in policy.decoder.parameters())
    hit = _WEIGHTS.get(policy)
    if hit is None or hit[0] != key:
        hit = (key, tuple(_layer_arrays(policy)), tuple(_head_arrays(policy)))
        _WEIGHTS[policy] = hit
    return hit[1], hit[2]


def run(policy: LamboPolicy, batch: PolicyBatch, enc: Encoded, noise: DecodeNoise | None):
    """``fast_decode.run``'s contract (logits, allowed, target, u, Beta concentrations as tensors) on
    the Numba kernel."""
    statics, dims = statics_and_dims(policy, batch, enc, noise is None)
    steps = [  # the network's tokens in float32, the MEC state in float64 (as the torch loop computes it)
        _step_major(t.float() if idx < 4 else t.double() if t.is_floating_point() else t)
        for idx, t in enumerate(step_tensors(policy, batch, enc).values())
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
    dims_k = (
        dims.greedy, dims.d, h, dims.share_eps, dims.fit_scale, dims.logit_clip, dims.ptr_scale, dims.att_scale,
        float(policy.decoder.layers[0].norm_sa.eps), float(policy.decoder.norm_out.eps),
    )  # fmt: skip
    statics_k = (
        _np(statics.tok_table), _np(statics.ca_mask[:, 0, 0]), _np(statics.pool_w[:, 0]),
        _np(statics.rem_ext), _np(statics.load_ext),
    )  # fmt: skip
    out = decode_kernel(
        dims_k, tuple(steps), (greedy_rows, uniform, normal, accept), statics_k, (ue_k, ue_v, mem_k, mem_v),
        *_weight_arrays(policy),
    )  # fmt: skip
    return tuple(torch.from_numpy(a).to(enc.ue.device) for a in out)
