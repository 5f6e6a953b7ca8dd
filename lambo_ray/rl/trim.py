"""Padding trim and size chunks for RLlib batches of mixed cell sizes.

Why: observations are padded to the distribution's largest cell (n_max = 200 UEs, m_max = 10 servers
by default) because RLlib needs fixed observation shapes, but cells are drawn log-uniformly from
10-200 UEs, so most rows are mostly padding. The encoder's attention costs O((N + M)^2) per row, teacher
forcing O(N^2) and the decode loop one step per UE, all over the *padded* sizes. Real UEs and servers
always come first in a padded row (:func:`lambo_ray.policy.features.collate`), so cutting a batch to its
largest real N and M changes no result, only the cost.

One trim per batch gains little on a mixed batch (its largest cell is almost always near n_max), so
the rows are also sorted by size and run in chunks of similar size, each trimmed to its own largest
cell; outputs are padded back and put in the original row order. Measured on the default distribution
(S model, one thread, a loaded 2-core machine): teacher forcing + backward of 128 rows 11.1 s padded,
11.9 s with one trim, 4.3 s in chunks of 16 or 32 rows; sampling decode of 32 rows 2.3 s padded,
1.5-2.0 s with one trim, 1.1 s in chunks of 16 (8: 1.1-1.2 s, 4: 1.4-2.0 s: too many decode steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
import torch.nn.functional as F

from lambo_ray.policy import PolicyBatch

# Which axes of each PolicyBatch field are UEs / servers (axis 1 = UEs for all but the server fields).
UE_FIELDS = frozenset({"ue", "local_lat", "local_ok", "ue_mask", "order"})
PAIR_FIELDS = frozenset({"pair", "amin", "reserve", "lat_base", "sqrt_work"})  # (B, N, M, ...)
SERVER_FIELDS = frozenset({"server", "server_mask"})
OTHER_FIELDS = frozenset({"prompt"})


def trim(pb: PolicyBatch) -> PolicyBatch:
    """``pb`` cut to the largest real N and M among its rows (at least 1 of each). Decode positions
    past a row's N hold padding (``order`` maps them to themselves), so cutting keeps every row whole."""
    n = max(1, int(pb.ue_mask.sum(1).max()))
    m = max(1, int(pb.server_mask.sum(1).max()))
    if n == pb.n_max and m == pb.m_max:
        return pb
    out = {}
    for f in fields(pb):
        x = getattr(pb, f.name)
        if f.name in UE_FIELDS:
            out[f.name] = x[:, :n]
        elif f.name in PAIR_FIELDS:
            out[f.name] = x[:, :n, :m]
        elif f.name in SERVER_FIELDS:
            out[f.name] = x[:, :m]
        elif f.name in OTHER_FIELDS:
            out[f.name] = x
        else:  # a new field must be classified above, or trimming would silently misalign it
            raise KeyError(f"trim: PolicyBatch field {f.name!r} has no known UE/server axes")
    return PolicyBatch(**out)


def size_chunks(pb: PolicyBatch, rows: int) -> list[torch.Tensor]:
    """Row indices in chunks of ``rows`` rows of similar cost (sorted by N, then M); one chunk of all
    rows in their order when ``rows`` is 0 or covers the batch."""
    b = pb.batch_size
    if rows <= 0 or rows >= b:
        return [torch.arange(b, device=pb.ue.device)]
    n = pb.ue_mask.sum(1).long()
    m = pb.server_mask.sum(1).long()
    order = torch.argsort(n * (pb.m_max + 1) + m, stable=True)
    return list(torch.split(order, rows))


def pad_last(x: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of a (B, n, ...) per-UE tensor back to ``size``."""
    extra = size - x.shape[1]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad, value=value)


def index_rows(pb: PolicyBatch, idx: torch.Tensor) -> PolicyBatch:
    """Rows ``idx`` of every field (a plain gather; ``PolicyBatch.index`` does the same for one slice)."""
    return PolicyBatch(**{f.name: getattr(pb, f.name)[idx] for f in fields(pb)})


def run_chunked(
    pb: PolicyBatch,
    rows: int,
    trim_padding: bool,
    fn: Callable[[PolicyBatch, torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``fn(sub_batch, row_index)`` over size chunks, outputs re-assembled in the batch's row order.

    ``fn`` returns tensors with the chunk's rows first; per-UE outputs (names in ``PER_UE``; dim 1 = the
    chunk's trimmed N) are padded back to the batch's N.
    """
    chunks = size_chunks(pb, rows if trim_padding else 0)
    outs: list[dict[str, torch.Tensor]] = []
    for idx in chunks:
        sub = pb if len(chunks) == 1 else index_rows(pb, idx)
        sub = trim(sub) if trim_padding else sub
        out = fn(sub, idx)
        outs.append({k: pad_last(v, pb.n_max, PER_UE[k]) if k in PER_UE else v for k, v in out.items()})
    if len(outs) == 1:
        return outs[0]
    inverse = torch.argsort(torch.cat(chunks))
    return {k: torch.cat([o[k] for o in outs])[inverse] for k in outs[0]}


# Output names that are per UE, (B, N), and the value their padding takes (as the untrimmed forward
# passes leave it: 0, and u = 0.5 where no share was drawn).
PER_UE = {"logp_target": 0.0, "logp_share": 0.0, "target": 0, "share": 0.0, "u": 0.5}
