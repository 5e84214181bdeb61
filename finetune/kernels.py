"""Attention within the segments of packed tokens (varlen): the kernel every backend of ours uses.

Flat tokens q [T, H, D], k/v [T, Hkv, D] and segment boundaries cu [N+1]; each token attends only
within its own segment (causally for the LLM, both ways for the media encoders). Below the
families (Baichuan's audio encoder calls it) and below attention.py (which registers the
backends with transformers).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: kernel of `varlen` off CUDA: "grouped" (segments of similar length stacked, a few SDPA calls)
#: or "dense" (one masked SDPA over all tokens, built on the device from cu_seqlens: no host
#: read, as on CUDA; slower, for tests that count what would synchronise on a GPU)
CPU_KERNEL = "grouped"


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, *, causal: bool,
           scale: float | None = None, dropout: float = 0.0, window: int | None = None) -> torch.Tensor:
    """Attention within each segment [cu[i], cu[i+1]) of flat tokens: q [T, H, D], k/v [T, Hkv, D].

    `window` (causal only): a sliding-window layer's width, as transformers counts it: a query sees
    itself and the `window - 1` keys before it in its segment. On CUDA PyTorch's `varlen_attn`
    (flash kernels shipped with PyTorch; `max_len` a host int, so no device read); elsewhere
    `CPU_KERNEL`."""
    if window is not None:
        if not causal:
            raise ValueError("varlen: a sliding window needs causal attention")
        if window < 1:
            raise ValueError(f"varlen: sliding window {window} < 1")
        if window >= max_len:  # no segment is longer than the window: plain causal attention
            window = None
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and hasattr(torch.nn.attention, "varlen"):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu.to(q.device, torch.int32)
        left = -1 if window is None else window - 1
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(left, 0) if causal else (-1, -1),
                           enable_gqa=gqa)
    if CPU_KERNEL == "dense":
        return _dense(q, k, v, cu, causal=causal, scale=scale, dropout=dropout, gqa=gqa, window=window)
    T = q.shape[0]
    out = torch.empty_like(q)
    buckets = _buckets(tuple(cu.tolist()), T, str(q.device))
    padded = None
    if any(idx is not None for idx, _, _ in buckets):
        padded = [torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in (q, k, v)]  # row T: the zero pad
    for idx, keep, (s, e) in buckets:
        if idx is None:  # a single segment: a plain call on its slice
            qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            mask = None
        else:  # segments of similar length, right-padded to the longest: [S, H, M, D]
            qs, ks, vs = (t[idx].transpose(1, 2) for t in padded)
            # causal: a real query sees only earlier keys, all real; otherwise mask the pad keys
            mask = None if causal else (idx < T)[:, None, None, :]
        if window is not None and qs.shape[2] > window:
            # every segment (or stack) starts at 0: one band serves them all; where it is no longer
            # than the window the band is the causal mask (is_causal, the reference's kernel)
            mask = _band(qs.shape[2], window, str(q.device))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=scale, dropout_p=dropout, enable_gqa=gqa)
        if idx is None:
            out[s:e] = o[0].transpose(0, 1)
        else:
            out[keep] = o.transpose(1, 2)[idx < T]
    return out


@functools.lru_cache(maxsize=32)
def _band(n: int, window: int, device: str) -> torch.Tensor:
    """[n, n] causal sliding-window mask: query i sees keys i - window + 1 .. i."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def _dense(q, k, v, cu, *, causal: bool, scale, dropout, gqa, window: int | None = None) -> torch.Tensor:
    T = q.shape[0]
    pos = torch.arange(T, device=q.device)
    seg = torch.searchsorted(cu[1:].to(q.device, torch.long), pos, right=True)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= pos[:, None] >= pos[None, :]
    if window is not None:
        mask &= (pos[:, None] - pos[None, :]) < window
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask[None, None], scale=scale, dropout_p=dropout, enable_gqa=gqa)
    return o[0].transpose(0, 1)


@functools.lru_cache(maxsize=64)
def _buckets(bounds: tuple[int, ...], n: int, device: str, spread: float = 1.5):
    """Group a row's segments by length for the non-CUDA path: [(idx, keep, (s, e))].

    Causal attention over a segment right-padded with zeros is exact for its real tokens (a
    query never sees a later key, and every earlier key is real), so segments whose lengths are
    within `spread` of each other share one SDPA call on a [S, H, M, D] stack: a few calls per
    layer instead of one per sample (each costs tens of microseconds of dispatch on the CPU),
    at most spread^2 x the attention arithmetic of the exact sum(n_i^2) for the shortest ones.
    idx [S, M] gathers the stack from the flat tokens (n = a zero row); keep lists their
    positions in the row. A bucket of one segment is returned as its slice (s, e).
    """
    segs = sorted(((e - s, s) for s, e in zip(bounds[:-1], bounds[1:]) if e > s), reverse=True)
    groups: list[list[tuple[int, int]]] = []
    for length, s in segs:
        if groups and length * spread >= groups[-1][0][0]:
            groups[-1].append((length, s))
        else:
            groups.append([(length, s)])
    out = []
    for g in groups:
        if len(g) == 1:
            out.append((None, None, (g[0][1], g[0][1] + g[0][0])))
            continue
        M = g[0][0]
        starts = torch.tensor([s for _, s in g])
        lens = torch.tensor([n for n, _ in g])
        j = torch.arange(M)
        idx = torch.where(j < lens[:, None], starts[:, None] + j, n)
        out.append((idx.to(device), idx[idx < n].to(device), (0, 0)))
    return out


