"""Attention backends: choose one, and register `varlen` through transformers' interface.

`varlen` attends within each packed sample only, with boundaries taken from the restarting
text positions of a packed row (no mask is built): on CUDA it calls PyTorch's own
`torch.nn.attention.varlen.varlen_attn` (flash-attention kernels shipped with PyTorch, no
flash-attn build needed); elsewhere it runs causal SDPA on the samples grouped by length
(right-padded stacks, exact under a causal mask), so the cost is close to sum(n_i^2) instead
of the L^2 a dense block-diagonal mask costs, in a few calls per layer. It is used for the LLM of
packed training rows; batches with an attention mask (padded training, generation) fall back
to SDPA.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from finetune.errors import MissingExtraError

VARLEN = "varlen"
#: backends that take the packed rows' sample boundaries (cu_seq_lens_*, max_length_*) from the collator
VARLEN_ARGS = ("flash_attention_2", VARLEN)
_registered = False
segment_calls = 0  # packed rows handled segment-wise (tests read it to prove the path ran)
boundary_recomputes = 0  # layers that had to rebuild the boundaries from positions (a sync each on CUDA)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row, from where its positions restart at 0."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(position_ids.shape[-1])]
    return list(zip(starts, ends))


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, position_ids=None, **kwargs):
    """transformers attention function: [B, H, L, D] in, ([B, L, H, D], None) out."""
    if attention_mask is not None or position_ids is None or not getattr(module, "is_causal", True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None and attention_mask.dim() == 2:
            # our mask function hands over the 2-D padding mask; SDPA wants causal & padding in 4-D
            L_q, L_k = query.shape[2], key.shape[2]
            causal = torch.ones(L_q, L_k, dtype=torch.bool, device=query.device).tril(L_k - L_q)
            attention_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    global segment_calls, boundary_recomputes
    segment_calls += 1
    B, H, L, D = query.shape
    gqa = key.shape[1] != H
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        # boundaries from the restarting text positions (costs a device sync per layer on CUDA;
        # the packed collator hands cu_seq_lens_q / max_length_q over once per batch instead)
        boundary_recomputes += 1
        pos = position_ids if position_ids.dim() == 2 else position_ids.view(-1, L)
        seg = [(b * L + s, b * L + e) for b in range(B) for s, e in _segments(pos[b if pos.shape[0] > 1 else 0])]
        cu = torch.tensor([0] + [e for _, e in seg], dtype=torch.int32, device=query.device)
        max_len = max(e - s for s, e in seg)
    if query.is_cuda and hasattr(torch.nn.attention, "varlen"):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu.to(query.device, torch.int32)
        q = query.transpose(1, 2).reshape(B * L, H, D)
        k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * L, value.shape[1], D)
        out = varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, window_size=(-1, 0),
                          enable_gqa=gqa)
        return out.view(B, L, H, D), None
    flat = [t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (query, key, value)]
    out = torch.empty(B * L, H, D, dtype=query.dtype, device=query.device)
    buckets = _buckets(tuple(cu.tolist()), B * L, str(query.device))
    if any(idx is not None for idx, _, _ in buckets):
        padded = [torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in flat]  # row B*L: the zero pad
    for idx, keep, (s, e) in buckets:
        if idx is None:  # a single segment: a plain causal call on its slice
            q, k, v = (t[s:e].transpose(0, 1)[None] for t in flat)
        else:  # segments of similar length, right-padded to the longest: [S, H, M, D]
            q, k, v = (t[idx].transpose(1, 2) for t in padded)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                           enable_gqa=gqa)
        if idx is None:
            out[s:e] = o[0].transpose(0, 1)
        else:
            out[keep] = o.transpose(1, 2)[idx < B * L]
    return out.view(B, L, H, D), None


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


def configure_cuda_kernels() -> None:
    """Keep SDPA off its cuDNN kernel on CUDA: it builds an execution plan for every new shape.

    Packed rows (and the encoders' per-image calls) change length at almost every step, so
    cuDNN's per-shape plans dominated the first epoch on an H100 (0.4-2.6 s per step of the
    tiny model vs 0.05-0.1 s once cached); flash and memory-efficient SDPA need no plan.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def register() -> None:
    """Make `varlen` a transformers attention implementation (its mask function builds no mask)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    _registered = True


def choose(setting: str, packing: bool) -> str:
    """auto -> flash_attention_2 if installed (CUDA), else varlen for packed rows, else sdpa."""
    if setting != "auto":
        if setting == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise MissingExtraError("model.attn: flash_attention_2 needs flash-attn: pip install -e '.[flash]' "
                              "(CUDA only), or use model.attn: varlen")
        return setting
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN if packing else "sdpa"


def apply_to_llm(model, attn: str) -> None:
    """Switch only the LLM to `attn`; the encoders keep SDPA (they isolate images/audio themselves)."""
    if attn == VARLEN:
        register()
    text_cfg = model.config.get_text_config()
    text_cfg._attn_implementation = attn
