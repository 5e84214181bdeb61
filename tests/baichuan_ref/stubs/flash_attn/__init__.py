"""Stand-in for the `flash_attn` package (our own code, for the Baichuan-Omni reference harness).

The reference imports `from flash_attn import flash_attn_varlen_func` at module level in
audio_modeling_omni.py, visual_modeling_omni.py, sequence_parallel_utils.py and
matcha_transformer.py, and calls it for the LLM's packed (seqlens) path, the audio encoder and
decoder, and the flow-matching prenet. flash-attn needs CUDA, so on the CPU this module provides
the same function computed exactly with torch's scaled_dot_product_attention, one cu_seqlens
segment at a time.

It has no package metadata on purpose: transformers' `is_flash_attn_2_available()` looks for the
installed distribution and therefore still reports False, so nothing in transformers picks it up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__version__ = "0.0.0+baichuan-ref-stub"


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table=None,
    **kwargs,
) -> torch.Tensor:
    """Variable-length attention with flash-attn 2's semantics.

    q: [total_q, H, D]; k, v: [total_k, Hk, D] with H % Hk == 0 (GQA: query head h reads KV head
    h // (H // Hk), i.e. contiguous groups, as in flash-attn). cu_seqlens_*: int32 [B+1] offsets.
    Segment b attends q[cu_q[b]:cu_q[b+1]] to k/v[cu_k[b]:cu_k[b+1]] only. causal=True uses
    flash-attn's bottom-right alignment (query i of a segment with Lq queries and Lk keys sees keys
    j <= i + Lk - Lq), which is the ordinary causal mask when Lq == Lk. The scale defaults to
    1/sqrt(D). The softmax is computed in float32 and the output is cast back to q's dtype, as flash
    does. Returns [total_q, H, D].
    """
    if dropout_p:
        raise NotImplementedError("stub flash_attn_varlen_func: dropout_p must be 0 (eval only)")
    if alibi_slopes is not None:
        raise NotImplementedError("stub flash_attn_varlen_func: alibi_slopes are not supported")
    if tuple(window_size) != (-1, -1) or softcap:
        raise NotImplementedError("stub flash_attn_varlen_func: no sliding window / softcap")
    if return_attn_probs:
        raise NotImplementedError("stub flash_attn_varlen_func: return_attn_probs unsupported")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("expected q, k, v of shape [total, heads, head_dim]")
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} not a multiple of kv heads {n_kv}")
    if n_kv != n_heads:
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError("cu_seqlens_q and cu_seqlens_k differ in length")
    if cq[0] != 0 or cq[-1] != q.shape[0] or ck[0] != 0 or ck[-1] != k.shape[0]:
        # Real flash-attn would silently leave rows past cu_seqlens[-1] unwritten; a verification
        # harness must not hide that.
        raise ValueError(f"cu_seqlens do not cover the inputs: q {q.shape[0]} rows, cu_q {cq}, "
                         f"k {k.shape[0]} rows, cu_k {ck}")
    out = torch.zeros(q.shape[0], n_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq <= 0:
            continue
        qs = q[q0:q1].transpose(0, 1).float()  # [H, Lq, D]
        ks = k[k0:k1].transpose(0, 1).float()
        vs = v[k0:k1].transpose(0, 1).float()
        mask = None
        if causal:
            i = torch.arange(lq, device=q.device).unsqueeze(1)
            j = torch.arange(lk, device=q.device).unsqueeze(0)
            mask = j <= i + (lk - lq)  # True = attend
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, scale=scale)
        if causal and lk < lq:
            # Rows with no visible key: flash-attn returns zeros there (SDPA would give NaN).
            o = torch.where(mask.any(-1).view(1, lq, 1), o, torch.zeros_like(o))
        out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """Batched [B, L, H, D] form, via flash_attn_varlen_func (not used by the reference)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * lk, lk, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q.reshape(b * lq, h, d), k.reshape(b * lk, k.shape[2], d), v.reshape(b * lk, v.shape[2], -1),
        cu_q, cu_k, lq, lk, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs,
    )
    return out.reshape(b, lq, h, -1)
