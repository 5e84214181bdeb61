"""The varlen backend's non-CUDA path against causal attention on each sample alone."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from finetune import attention, kernels


def reference(q, k, v, bounds, gqa):
    """Causal SDPA on each segment's slice of the flat [1, H, N, D] tensors, one call per sample."""
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                        enable_gqa=gqa)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("lengths", [
    [37, 5, 19, 18, 1, 64, 33, 9, 9, 2],  # buckets of several segments, singletons, length-1 samples
    [50],                                  # one sample filling the row
    [7, 7, 7, 7],                          # all equal: a single stack
], ids=["mixed", "one", "equal"])
def test_segment_stacks_equal_one_call_per_sample(lengths, kv_heads):
    torch.manual_seed(0)
    H, D, N = 4, 16, sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q = torch.randn(1, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, N, D, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32)
    module = types.SimpleNamespace(is_causal=True)
    before = attention.segment_calls
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=torch.zeros(1, N),
                                                cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert attention.segment_calls == before + 1
    ref = reference(q, k, v, bounds, kv_heads != H).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_buckets_group_similar_lengths_and_cover_every_token():
    lengths = [37, 5, 19, 18, 1, 64, 33, 9, 9, 2]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    N = bounds[-1]
    buckets = kernels._buckets(tuple(bounds), N, "cpu")
    covered = []
    for idx, keep, (s, e) in buckets:
        if idx is None:
            covered += range(s, e)
            continue
        real = idx[idx < N]
        assert torch.equal(real, keep)
        rows = (idx < N).sum(1)  # each stacked segment's length; the longest sets the width
        assert int(rows.max()) == idx.shape[1]
        assert int(rows.min()) * 1.5 >= idx.shape[1]  # within the spread of 1.5
        covered += keep.tolist()
    assert sorted(covered) == list(range(N))
    assert len(buckets) < len(lengths)  # fewer calls than samples


def windowed_reference(q, k, v, bounds, window, gqa):
    """Each sample alone under transformers' sliding-window rule (key j visible to query i when
    i - window < j <= i), one dense masked call per sample."""
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(e - s)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], attn_mask=mask,
                                                        enable_gqa=gqa)
    return out


@pytest.mark.parametrize("kernel", ["grouped", "dense"])
@pytest.mark.parametrize("window", [1, 4, 9, 64], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sliding_window_equals_each_sample_alone(monkeypatch, kernel, window, kv_heads):
    """A sliding-window layer's call (transformers passes `sliding_window`) keeps the window inside
    each packed sample, on every kernel; values and gradients as each sample alone (a window wider
    than every sample is plain causal attention)."""
    monkeypatch.setattr(kernels, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    lengths = [37, 5, 19, 18, 1, 30, 9, 9, 2]
    H, D, N = 4, 16, sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q = torch.randn(1, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, N, D, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, _ = attention.varlen_attention_forward(types.SimpleNamespace(is_causal=True), q, k, v, None,
                                                position_ids=torch.zeros(1, N), cu_seq_lens_q=cu,
                                                max_length_q=max(lengths), sliding_window=window)
    ref = windowed_reference(q, k, v, bounds, window, kv_heads != H).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    if window < max(lengths):  # the window really cut something
        assert not torch.allclose(ref, reference(q, k, v, bounds, kv_heads != H).transpose(1, 2))
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sliding_window_in_the_padded_fallback():
    """A padded batch (2-D mask) on the varlen backend falls back to SDPA with causal, padding and
    the window in one mask, also for queries that are the last of the keys (decoding with a cache)."""
    torch.manual_seed(0)
    B, H, L, D, window = 2, 2, 12, 8, 4
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(B, L, dtype=torch.long)
    pad[1, :3] = 0  # left padding
    module = types.SimpleNamespace(is_causal=True, training=False)
    out, _ = attention.varlen_attention_forward(module, q, k, v, pad, position_ids=None, sliding_window=window)
    i = torch.arange(L)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    for b in range(B):
        keep = pad[b].bool()
        mask = band & keep[None, :]
        ref = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], attn_mask=mask[None, None])
        torch.testing.assert_close(out[b:b + 1][:, keep.nonzero().flatten()], ref.transpose(1, 2)[:, keep], rtol=0,
                                   atol=1e-12)
    last, _ = attention.varlen_attention_forward(module, q[:, :, -3:], k, v, pad, position_ids=None,
                                                 sliding_window=window)
    torch.testing.assert_close(last, out[:, -3:], rtol=0, atol=1e-12)


def test_decoding_with_a_cache_and_no_mask_keeps_the_window():
    """A decoding step (fewer queries than cached keys) without a mask (nothing padded) takes the
    SDPA fallback with the causal window over the cache, not the packed path."""
    torch.manual_seed(0)
    B, H, L, D, window = 2, 2, 12, 8, 4
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    module = types.SimpleNamespace(is_causal=True, training=False)
    step, _ = attention.varlen_attention_forward(module, q[:, :, -1:], k, v, None, position_ids=torch.full((B, 1), L - 1),
                                                 sliding_window=window)
    ref = F.scaled_dot_product_attention(q[:, :, -1:], k[:, :, -window:], v[:, :, -window:])
    torch.testing.assert_close(step, ref.transpose(1, 2), rtol=0, atol=1e-12)
