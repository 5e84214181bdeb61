"""Attention within the segments of packed tokens (varlen): the kernel every backend of ours uses.

Flat tokens q [T, H, D], k/v [T, Hkv, D] and segment boundaries cu [N+1]; each token attends only
within its own segment (causally for the LLM, both ways for the media encoders). Below the
families (Baichuan's audio encoder calls it) and below attention.py (which registers the
backends with transformers).

Which kernel runs is decided once per (device, dtype, dropout, window) and recorded in `CHOSEN`:

- ``flash``: PyTorch's own `torch.nn.attention.varlen.varlen_attn` (flash-attention kernels that
  ship with PyTorch; no flash-attn build), on CUDA for fp16/bf16 on compute capability 8.0 or more,
  without attention dropout (the kernel has none). Its keyword arguments changed between torch
  releases (2.9: `is_causal`; 2.10: `scale`, `window_size`; 2.12: `enable_gqa`); `flash_call`
  adapts to the signature it finds, so the GPU machines' torch 2.11 and our lock's 2.13 both work.
- ``dense``: one masked SDPA over the row with the mask built on the device from cu (no host
  read): CUDA where flash cannot run (fp32, older GPUs, dropout, a window this torch's kernel
  lacks). Exact; costs attention over the whole row instead of each sample's.
- ``grouped``: segments of similar length stacked into a few SDPA calls (reads cu on the host,
  which is free on the CPU): the CPU path (`CPU_KERNEL`).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

try:  # a submodule: `hasattr(torch.nn.attention, "varlen")` stays False until something imports it
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # torch < 2.9
    _torch_varlen_attn = None

#: kernel of `varlen` off CUDA: "grouped" (segments of similar length stacked, a few SDPA calls)
#: or "dense" (one masked SDPA over all tokens, built on the device from cu_seqlens: no host
#: read, as on CUDA; slower, for tests that count what would synchronise on a GPU)
CPU_KERNEL = "grouped"
FLASH, DENSE, GROUPED = "flash", "dense", "grouped"
#: the flash kernel's minimum compute capability (Ampere) and dtypes
FLASH_CAPABILITY = (8, 0)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
#: (device, dtype, dropout > 0, window) -> (kernel, why): every choice made in this process, so a run
#: can say which kernel its attention took and tests can assert it
CHOSEN: dict[tuple, tuple[str, str]] = {}


class FlashSignature(NamedTuple):
    """What this torch's varlen_attn takes, read once from its signature."""

    is_causal: bool  # torch 2.9: causality as a flag (no window, no scale)
    window_size: bool  # torch 2.10+: (left, right); causal is (-1, 0)
    scale: bool
    enable_gqa: bool  # torch 2.12+; before it the kv heads are repeated here


def flash_signature(fn: Callable | None = None) -> FlashSignature | None:
    """The keyword arguments of `fn` (default: torch's varlen_attn); None when there is none."""
    fn = _torch_varlen_attn if fn is None else fn
    return None if fn is None else _signature_of(fn)


@functools.lru_cache(maxsize=8)
def _signature_of(fn: Callable) -> FlashSignature:
    params = inspect.signature(fn).parameters
    return FlashSignature(*(name in params for name in ("is_causal", "window_size", "scale", "enable_gqa")))


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def select(device: torch.device, dtype: torch.dtype, *, dropout: float = 0.0, window: int | None = None,
           capability: tuple[int, int] | None = None, signature: FlashSignature | None | str = "installed"
           ) -> tuple[str, str]:
    """(kernel, why) for attention on `device` in `dtype`: a pure decision (capability and signature
    may be given, for tests and for `plan`), see the module docstring."""
    if device.type != "cuda":
        return CPU_KERNEL, f"{device.type}: {'grouped SDPA calls' if CPU_KERNEL == GROUPED else 'one masked SDPA'}"
    sig = flash_signature() if signature == "installed" else signature
    cap = _capability(device) if capability is None else capability
    if sig is None:
        why = f"torch {torch.__version__} has no torch.nn.attention.varlen (2.9 or newer has it)"
    elif dtype not in FLASH_DTYPES:
        why = f"{str(dtype).replace('torch.', '')}: the flash kernel takes float16/bfloat16 only (train.precision bf16 or fp16)"
    elif tuple(cap) < FLASH_CAPABILITY:
        why = f"compute capability {cap[0]}.{cap[1]}: the flash kernel needs 8.0 or more"
    elif dropout > 0:
        why = f"attention dropout {dropout}: the flash kernel has none (set the model's attention_dropout to 0 to use it)"
    elif window is not None and not sig.window_size:
        why = f"a sliding window: torch {torch.__version__}'s varlen_attn has no window_size (2.10 or newer has it)"
    else:
        return FLASH, f"torch.nn.attention.varlen on compute capability {cap[0]}.{cap[1]}"
    return DENSE, why + "; one masked SDPA per row instead (exact, attention over the whole row)"


def _choice(q: torch.Tensor, dropout: float, window: int | None) -> str:
    key = (str(q.device), q.dtype, dropout > 0, window is not None)
    hit = CHOSEN.get(key)
    if hit is None:
        hit = CHOSEN[key] = select(q.device, q.dtype, dropout=dropout, window=window)
    return hit[0]


def flash_call(fn: Callable, sig: FlashSignature, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
               max_len: int, *, causal: bool, scale: float | None, window: int | None) -> torch.Tensor:
    """Call torch's varlen_attn `fn` (its keyword arguments as `sig` says) for the same result on
    every release: a scale the kernel cannot take is folded into q, kv heads it cannot share are
    repeated."""
    kw: dict = {}
    if k.shape[1] != q.shape[1]:
        if sig.enable_gqa:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scale is not None:
        if sig.scale:
            kw["scale"] = scale
        else:  # the kernel's own scale is 1/sqrt(D)
            q = q * (scale * math.sqrt(q.shape[-1]))
    if sig.window_size:
        left = -1 if window is None else window - 1
        kw["window_size"] = (left, 0) if causal else (-1, -1)
    else:
        if window is not None:
            raise ValueError("varlen: this torch's varlen_attn takes no sliding window")  # select() avoids it
        kw["is_causal"] = causal
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, *, causal: bool,
           scale: float | None = None, dropout: float = 0.0, window: int | None = None) -> torch.Tensor:
    """Attention within each segment [cu[i], cu[i+1]) of flat tokens: q [T, H, D], k/v [T, Hkv, D].

    `window` (causal only): a sliding-window layer's width, as transformers counts it: a query sees
    itself and the `window - 1` keys before it in its segment. The kernel: see the module docstring
    (`max_len` is a host int, so the flash and dense kernels read nothing back from the device)."""
    if window is not None:
        if not causal:
            raise ValueError("varlen: a sliding window needs causal attention")
        if window < 1:
            raise ValueError(f"varlen: sliding window {window} < 1")
        if window >= max_len:  # no segment is longer than the window: plain causal attention
            window = None
    gqa = k.shape[1] != q.shape[1]
    kernel = _choice(q, dropout, window) if q.is_cuda else CPU_KERNEL
    if kernel == FLASH:
        return flash_call(_torch_varlen_attn, flash_signature(), q, k, v, cu.to(q.device, torch.int32), max_len,
                          causal=causal, scale=scale, window=window)
    if kernel == DENSE:
        return _dense(q, k, v, cu, causal=causal, scale=scale, dropout=dropout, gqa=gqa, window=window)
    T = q.shape[0]
    out = None  # in SDPA's output dtype: under autocast that is the autocast dtype, not q's (fp32 after RoPE)
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
        if out is None:
            out = q.new_empty(q.shape, dtype=o.dtype)
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


