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

import importlib.util

import torch
import torch.nn.functional as F

from finetune.errors import MissingExtraError
from finetune.kernels import varlen

VARLEN = "varlen"
# The encoders' backend. transformers hands the per-image / per-window / per-chunk boundaries
# (cu_seqlens) of a vision or audio tower to the attention function in one call only when the
# implementation's name says flash (`is_flash_attention_requested`); otherwise it loops over the
# segments in Python with a host read per layer. This one is PyTorch's varlen kernel on CUDA and
# grouped SDPA elsewhere, so the name carries "flash" for that dispatch, nothing else.
ENCODER_VARLEN = "flash_varlen_encoders"
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
                             scaling: float | None = None, position_ids=None, sliding_window: int | None = None,
                             **kwargs):
    """transformers attention function for the LLM: [B, H, L, D] in, ([B, L, H, D], None) out.
    `sliding_window`: what transformers passes for a sliding-window layer (Gemma 3n, ...): the
    window is applied within each sample, from its own positions (None on global layers)."""
    causal_layer = getattr(module, "is_causal", True)
    # decoding with a KV cache: fewer queries than keys (the packed path is for training rows)
    cached = query.shape[2] != key.shape[2]
    if attention_mask is not None or position_ids is None or not causal_layer or cached:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is None and cached and causal_layer:
            # our mask function gives None when nothing is padded; the window still applies
            attention_mask = torch.ones(key.shape[0], key.shape[2], dtype=torch.long, device=key.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            # our mask function hands over the 2-D padding mask; SDPA wants causal & padding (& the
            # sliding window, which a flash-style mask function leaves to the kernel) in 4-D
            L_q, L_k = query.shape[2], key.shape[2]
            causal = torch.ones(L_q, L_k, dtype=torch.bool, device=query.device).tril(L_k - L_q)
            if sliding_window is not None:  # queries are the last L_q of the L_k positions
                causal = causal.triu(L_k - L_q - sliding_window + 1)
            attention_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    global segment_calls, boundary_recomputes
    segment_calls += 1
    B, H, L, D = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        # boundaries from the restarting text positions (costs a device sync per layer on CUDA;
        # the packed collator hands cu_seq_lens_q / max_length_q over once per batch instead)
        boundary_recomputes += 1
        pos = position_ids if position_ids.dim() == 2 else position_ids.view(-1, L)
        seg = [(b * L + s, b * L + e) for b in range(B) for s, e in _segments(pos[b if pos.shape[0] > 1 else 0])]
        cu = torch.tensor([0] + [e for _, e in seg], dtype=torch.int32, device=query.device)
        max_len = max(e - s for s, e in seg)
    flat = [t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (query, key, value)]
    out = varlen(*flat, cu, int(max_len), causal=True, scale=scaling, dropout=dropout, window=sliding_window)
    return out.view(B, L, H, D), None


def encoder_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                              scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                              is_causal: bool = False, **kwargs):
    """The encoders' attention (ENCODER_VARLEN): every image, window or audio chunk of the call in
    one varlen attention, from the cu_seqlens transformers hands a flash-style implementation.
    [1, H, T, D] in, ([1, T, H, D], None) out, not causal."""
    if cu_seq_lens_q is None or max_length_q is None:  # a plain call (no segments): one SDPA
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             dropout_p=dropout)
        return out.transpose(1, 2), None
    _, H, T, D = query.shape
    flat = [t[0].transpose(0, 1) for t in (query, key, value)]  # [T, H, D]
    out = varlen(*flat, cu_seq_lens_q, int(max_length_q), causal=is_causal, scale=scaling, dropout=dropout)
    return out[None], None


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
    AttentionInterface.register(ENCODER_VARLEN, encoder_attention_forward)
    AttentionMaskInterface.register(ENCODER_VARLEN, flash_attention_mask)
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


def apply_to_encoders(model, family) -> None:
    """The family's vision and audio towers take ENCODER_VARLEN: one attention call per layer for all
    of a row's images, windows and audio chunks (exact: each attends within its own segment)."""
    register()
    for cfg in family.encoder_attention_configs(model):
        cfg._attn_implementation = ENCODER_VARLEN


def apply_to_llm(model, attn: str) -> None:
    """Switch only the LLM to `attn`; the encoders keep SDPA (they isolate images/audio themselves)."""
    if attn == VARLEN:
        register()
    text_cfg = model.config.get_text_config()
    text_cfg._attn_implementation = attn
