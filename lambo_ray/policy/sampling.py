"""Sampling from pre-drawn noise, so a sampled decision depends only on (weights, instance, its seed).

``torch.multinomial`` and ``Beta.sample`` consume one shared random stream in batch order: the same
instance with the same seed would decode differently depending on which other instances share its
batch (Serve batches concurrent callers) or how far it is padded. Instead, each row's noise is drawn
up front from its own generator, and decoding maps noise to actions deterministically:

* target: inverse CDF of the masked categorical with one uniform per UE;
* share:  ``u = X / (X + Y)``, X ~ Gamma(alpha), Y ~ Gamma(beta), each by Marsaglia-Tsang
  (exact for concentrations >= 1, which the share head guarantees) with ``GAMMA_TRIES`` pre-drawn
  proposals; the chance that all are rejected is below 1e-7 and the variate then falls back to the
  Gamma's mode (d = alpha - 1/3, flagged nowhere: a negligible bias, not a wrong density).

The log-probabilities are still those of the exact categorical and Beta distributions.

:func:`categorical_from_uniform` and :func:`beta_from_noise` run inside the TorchScript-compiled decode
loop (:func:`lambo_ray.policy.fast_decode.decode_loop`): keep them TorchScript-compatible (typed tensor code,
no Python-side branching on tensor values); if they stop compiling, decoding falls back to eager with a
warning, and ``test_fast_decode_matches_a_straightforward_reference`` fails on the compiled check. The
Numba CPU kernel (:mod:`lambo_ray.policy.cpu_kernel`) maps the same noise to the same actions
(``_categorical``, ``_gamma``): a change here must be made there too (the same test pins both).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

GAMMA_TRIES = 6


@dataclass
class DecodeNoise:
    uniform: torch.Tensor  # (B, N) for the target
    normal: torch.Tensor  # (B, N, 2, GAMMA_TRIES) Marsaglia-Tsang proposals for the two Gammas
    accept: torch.Tensor  # (B, N, 2, GAMMA_TRIES) uniforms of the acceptance tests
    greedy: torch.Tensor | None = None  # (B,) bool: rows decoded greedily in the same pass (None: none)

    def to(self, device: torch.device | str) -> DecodeNoise:
        greedy = None if self.greedy is None else self.greedy.to(device)
        return DecodeNoise(self.uniform.to(device), self.normal.to(device), self.accept.to(device), greedy)


def _draw(rows: int, n: int, generator: torch.Generator | None) -> DecodeNoise:
    return DecodeNoise(
        uniform=torch.rand(rows, n, generator=generator, dtype=torch.float64),
        normal=torch.randn(rows, n, 2, GAMMA_TRIES, generator=generator, dtype=torch.float64),
        accept=torch.rand(rows, n, 2, GAMMA_TRIES, generator=generator, dtype=torch.float64),
    )


def batch_noise(batch_size: int, n_max: int, generator: torch.Generator | None = None) -> DecodeNoise:
    """Noise for a whole batch from one stream (training rollouts: per-row independence not needed)."""
    return _draw(batch_size, n_max, generator)


def row_noise(seeds: Sequence[int], n_ues: Sequence[int], n_max: int) -> DecodeNoise:
    """Noise of each row from its own seed, one UE after the other: row r's first ``n_ues[r]`` draws
    do not depend on the batch, its size or its padding."""
    parts = []
    for seed, n in zip(seeds, n_ues):
        g = torch.Generator().manual_seed(int(seed))
        parts.append(_draw(1, n, g))
    pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, n_max - t.shape[1]))  # noqa: E731
    return DecodeNoise(*(torch.cat([pad(getattr(p, f)) for p in parts]) for f in ("uniform", "normal", "accept")))


def instance_seed(seed: int, arrays: Sequence[np.ndarray], *salt: object) -> int:
    """A 63-bit seed from the user's seed, the instance's data and a salt (copy index, purpose)."""
    h = hashlib.sha256(repr((int(seed), *salt)).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def categorical_from_uniform(logp: torch.Tensor, allowed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the last dim; never lands on a disallowed option. ``u`` in [0, 1)."""
    p = torch.where(allowed, logp.double().exp(), torch.zeros_like(logp, dtype=torch.float64))
    cdf = p.cumsum(-1)
    idx = (cdf <= (u * cdf[..., -1])[..., None]).sum(-1)
    last_allowed = allowed.shape[-1] - 1 - allowed.flip(-1).long().argmax(-1)
    idx = torch.minimum(idx, last_allowed)
    # Skip zero-probability options that a boundary draw may hit (always computed: no host sync).
    bad = ~torch.gather(allowed, -1, idx[..., None])[..., 0]
    return torch.where(bad, allowed.long().argmax(-1), idx)


def gamma_from_noise(alpha: torch.Tensor, normal: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
    """Marsaglia-Tsang Gamma(alpha, 1) for alpha >= 1 from K pre-drawn (normal, uniform) pairs (..., K)."""
    a = alpha.double()[..., None]
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    v = (1.0 + c * normal) ** 3
    ok = v > 0
    logv = torch.log(torch.where(ok, v, torch.ones_like(v)))
    ok = ok & (torch.log(accept) < 0.5 * normal**2 + d - d * v + d * logv)
    first = ok.long().argmax(-1, keepdim=True)
    sample = torch.gather(d * v, -1, first)[..., 0]
    return torch.where(ok.any(-1), sample, d[..., 0])


def beta_from_noise(
    alpha: torch.Tensor, beta: torch.Tensor, normal: torch.Tensor, accept: torch.Tensor
) -> torch.Tensor:
    """Beta(alpha, beta) = X / (X + Y); ``normal``/``accept`` (..., 2, K). Returns float64.

    Both Gammas go through one elementwise call (the same values as two calls, half the ops).
    """
    xy = gamma_from_noise(torch.stack([alpha, beta], -1), normal, accept)
    x = xy[..., 0]
    return x / (x + xy[..., 1])
