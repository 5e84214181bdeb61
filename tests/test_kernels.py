"""Which attention kernel runs where, decided without a GPU: torch's flash varlen kernel on CUDA for
fp16/bf16 on compute capability 8.0+, the device-mask kernel elsewhere on CUDA, grouped SDPA on the
CPU; and the flash call's keyword arguments for each torch release's varlen_attn signature."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from finetune import kernels
from finetune.kernels import DENSE, FLASH, FlashSignature

from conftest import ROOT

TORCH_2_9 = FlashSignature(is_causal=True, window_size=False, scale=False, enable_gqa=False)
TORCH_2_11 = FlashSignature(is_causal=False, window_size=True, scale=True, enable_gqa=False)
TORCH_2_13 = FlashSignature(is_causal=False, window_size=True, scale=True, enable_gqa=True)
CUDA = torch.device("cuda", 0)


@pytest.mark.slow
def test_the_cuda_kernel_is_found_after_importing_the_package():
    """torch.nn.attention.varlen is a submodule: it exists only once something imports it. In a
    fresh process that imports the toolkit (and the libraries it uses), the kernel must be there."""
    code = ("import torch, transformers, peft, trl, finetune, finetune.attention, finetune.kernels\n"
            "print(hasattr(torch.nn.attention, 'varlen'), finetune.kernels.flash_signature() is not None)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("dtype,capability,dropout,window,signature,expected", [
    (torch.bfloat16, (9, 0), 0.0, None, TORCH_2_13, FLASH),          # H100
    (torch.float16, (8, 6), 0.0, 32, TORCH_2_13, FLASH),             # RTX 30xx, sliding window
    (torch.bfloat16, (8, 0), 0.0, 32, TORCH_2_11, FLASH),            # the GPU machines' torch 2.11
    (torch.bfloat16, (8, 0), 0.0, None, TORCH_2_9, FLASH),           # torch 2.9: is_causal
    (torch.bfloat16, (8, 0), 0.0, 32, TORCH_2_9, DENSE),             # ... has no window
    (torch.float32, (9, 0), 0.0, None, TORCH_2_13, DENSE),           # fp32: flash takes 16-bit only
    (torch.float16, (7, 5), 0.0, None, TORCH_2_13, DENSE),           # T4 / RTX 20xx
    (torch.float16, (7, 0), 0.0, None, TORCH_2_13, DENSE),           # V100
    (torch.bfloat16, (9, 0), 0.1, None, TORCH_2_13, DENSE),          # dropout: flash would drop it
    (torch.bfloat16, (9, 0), 0.0, None, None, DENSE),                # torch < 2.9: no varlen module
])
def test_kernel_choice(dtype, capability, dropout, window, signature, expected):
    kernel, why = kernels.select(CUDA, dtype, dropout=dropout, window=window, capability=capability,
                                 signature=signature)
    assert kernel == expected, why
    if expected == DENSE:
        assert "instead" in why  # the reason is said, with what runs instead


def test_cpu_takes_the_cpu_kernel():
    assert kernels.select(torch.device("cpu"), torch.float32)[0] == kernels.CPU_KERNEL


def _segments_reference(q, k, v, bounds, *, causal, scale, window):
    """Each segment alone with SDPA ([T, H, D] flat tensors)."""
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        i = torch.arange(n)
        mask = torch.ones(n, n, dtype=torch.bool)
        if causal:
            mask &= i[:, None] >= i[None, :]
        if window is not None:
            mask &= (i[:, None] - i[None, :]) < window
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                           v[s:e].transpose(0, 1)[None], attn_mask=mask[None, None], scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        out[s:e] = o[0].transpose(0, 1)
    return out


def recorder_for(signature: FlashSignature, calls: list):
    """A stand-in for torch's varlen_attn with that release's keyword arguments: it refuses what
    the release would refuse and computes the attention the release would."""

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(sorted(kw))
        allowed = {n for n, ok in zip(FlashSignature._fields, signature) if ok}
        assert set(kw) <= allowed, f"{set(kw) - allowed} is not a keyword of this release"
        if not signature.enable_gqa:
            assert k.shape[1] == q.shape[1], "this release has no enable_gqa: kv heads must match"
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
        if signature.window_size:
            left, right = kw.get("window_size", (-1, -1))
            causal, window = right == 0, (None if left < 0 else left + 1)
        else:
            causal, window = kw.get("is_causal", False), None
        return _segments_reference(q, k, v, cu_q.tolist(), causal=causal, scale=kw.get("scale"), window=window)

    return attend


@pytest.mark.parametrize("signature", [TORCH_2_9, TORCH_2_11, TORCH_2_13], ids=["2.9", "2.11", "2.13"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal,window,scale", [(True, None, None), (True, 5, 0.3), (False, None, 0.2)],
                         ids=["causal", "window-scale", "encoder"])
def test_flash_call_gives_the_same_attention_on_every_release(signature, kv_heads, causal, window, scale):
    if window is not None and not signature.window_size:
        pytest.skip("select() never sends a window to a release without window_size")
    torch.manual_seed(0)
    bounds = [0, 7, 8, 20, 33]
    T, H, D = bounds[-1], 4, 8
    q = torch.randn(T, H, D, dtype=torch.float64)
    k, v = (torch.randn(T, kv_heads, D, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor(bounds, dtype=torch.int32)
    calls: list = []
    out = kernels.flash_call(recorder_for(signature, calls), signature, q, k, v, cu, 13, causal=causal, scale=scale,
                             window=window)
    ref = _segments_reference(q, k, v, bounds, causal=causal, scale=scale, window=window)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert len(calls) == 1


def test_varlen_on_cuda_tensors_reaches_the_flash_kernel(monkeypatch):
    """The whole dispatch on (fake) CUDA tensors: bf16 on an sm90 goes to torch's kernel with the
    installed release's keywords; fp32 goes to the device-mask kernel; the choice is recorded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls: list = []

    def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                   enable_gqa=False):  # torch 2.13's keywords
        kw = {"scale": scale, "window_size": window_size, "enable_gqa": enable_gqa}
        calls.append((q.device.type, q.dtype, sorted(k for k, v in kw.items() if v not in (None, False, (-1, -1)))))
        return torch.empty_like(q)

    def fake_dense(q, k, v, cu, **kw):  # (views of fake CUDA tensors fail in a CPU-only torch build)
        calls.append((q.device.type, q.dtype, "dense"))
        return torch.empty_like(q)

    monkeypatch.setattr(kernels, "_torch_varlen_attn", fake_flash)
    monkeypatch.setattr(kernels, "_dense", fake_dense)
    monkeypatch.setattr(kernels, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(kernels, "CHOSEN", {})
    with FakeTensorMode(allow_non_fake_inputs=True):
        cu = torch.zeros(3, dtype=torch.int32, device="cuda")  # values do not matter to fake tensors
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.empty(12, 4, 16, dtype=dtype, device="cuda")
            kv = torch.empty(12, 2, 16, dtype=dtype, device="cuda")
            kernels.varlen(q, kv, kv, cu, 7, causal=True, scale=0.25, window=4)
    assert calls == [("cuda", torch.bfloat16, ["enable_gqa", "scale", "window_size"]), ("cuda", torch.float32, "dense")]
    chosen = {dtype: kernel for (_, dtype, _, _), (kernel, _) in kernels.CHOSEN.items()}
    assert chosen == {torch.bfloat16: FLASH, torch.float32: DENSE}


@pytest.mark.parametrize("kernel", ["grouped", "dense"])
def test_cpu_kernels_under_bf16_autocast(monkeypatch, kernel):
    """Under autocast, q is fp32 after RoPE while SDPA returns bf16: the kernels give the autocast
    dtype (a bf16 result written into an fp32 buffer failed: 'Index put requires the source and
    destination dtypes match')."""
    monkeypatch.setattr(kernels, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    bounds = [0, 7, 8, 20, 33, 35]
    q, k, v = (torch.randn(bounds[-1], 4, 16) for _ in range(3))
    cu = torch.tensor(bounds, dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.varlen(q, k, v, cu, 13, causal=True)
    assert out.dtype == torch.bfloat16
    ref = _segments_reference(q, k, v, bounds, causal=True, scale=None, window=None)
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
