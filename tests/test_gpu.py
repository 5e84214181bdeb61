"""GPU checks (marked `gpu`, skipped without CUDA): packed rows on CUDA attention kernels.

PyTorch's varlen kernel (flash-attention inside PyTorch) and SDPA's block-diagonal path run in
bf16 only, so packed vs one-by-one is judged relative to the values compared (verify.TOL_16BIT).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from media_samples import MIXES, sample

from finetune.models import load_spec
from finetune.verify import TOL_16BIT, compare_packed, perturb_lora_b

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_cuda_bf16():
    from finetune import adapters
    from finetune.families import get_family
    from finetune.recipe import load_recipe

    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", ["model.max_pixels=12544", "roles.vision_encoder.mode=lora",
                                          "roles.audio_projector.mode=full"])
    loaded = fam.load(load_spec(recipe, dtype=torch.bfloat16, attn="sdpa"))
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    model.to("cuda")
    perturb_lora_b(model, 0.05)
    return fam, loaded, model


BACKENDS = ["varlen", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("towers", [False, True], ids=["towers_own", "towers_as_training"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_one_by_one_on_cuda_bf16(tiny_cuda_bf16, media_dir, backend, towers):
    """`towers_as_training`: the towers' inputs from the collator and their attention one
    varlen call per layer (PyTorch's CUDA kernel), as training runs them."""
    from finetune import attention

    fam, loaded, model = tiny_cuda_bf16
    samples = [sample(media_dir, MIXES[m], answer=f"Yes. Case {i} {m}.")
               for i, m in enumerate(["text", "image", "audio", "video", "two_images", "all", "text"])]
    before = attention.segment_calls
    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                         tol=TOL_16BIT, relative=True, packed_attn=backend, setting=f"bf16 cuda {backend}",
                         varlen_args=backend != "sdpa", towers=towers)
    print(res.format())
    assert res.n_rows == 1
    if backend == "varlen":
        assert attention.segment_calls > before  # the varlen kernel really ran
        assert_flash_ran()
    assert res.passed, res.format()


def assert_flash_ran():
    """On a GPU with the flash kernel (compute capability 8.0+), bf16 attention took it."""
    from finetune import kernels

    if torch.cuda.get_device_capability() < kernels.FLASH_CAPABILITY:
        pytest.skip("no flash kernel below compute capability 8.0")
    chosen = {dtype: kernel for (dev, dtype, _, _), (kernel, _) in kernels.CHOSEN.items() if dev.startswith("cuda")}
    assert chosen.get(torch.bfloat16) == kernels.FLASH, kernels.CHOSEN


def test_broken_isolation_is_caught_on_cuda(tiny_cuda_bf16, media_dir):
    fam, loaded, model = tiny_cuda_bf16
    samples = [sample(media_dir, MIXES[m], answer="Yes. Broken.") for m in ("image", "text", "audio")]

    def mutate(batch):
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                         tol=TOL_16BIT, relative=True, mutate=mutate, packed_attn="sdpa")
    assert not res.passed, res.format()


@pytest.mark.parametrize("recipe_name", ["medical-tiny", "medical-baichuan-tiny"])
def test_no_host_sync_inside_the_llm_and_the_towers_on_cuda(media_dir, recipe_name):
    """tests/test_host_syncs.py on the GPU itself, with CUDA's varlen kernel: no device read in the
    decoder layers, the towers or the backward; the glue as named there."""
    import sync_counter as H

    fam, loaded, model, batch, _ = H.packed_step(None, recipe_name, media_dir)
    model.to("cuda")
    from finetune.verify import to_model

    batch = to_model(batch, model, fam)
    labels = batch.pop("labels")
    # bf16 autocast, as training runs on a GPU: the flash kernel (fp32 would take the dense one)
    with H.counting(H.regions(fam, model)) as c, torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch, labels=labels)
        c.region = "backward"
        out.loss.backward()
    assert_flash_ran()
    inside = {k: n for k, n in c.seen.items() if k[0] in ("llm", "vision", "audio", "backward")}
    assert inside == {}, inside
    assert {k: n for k, n in c.seen.items() if k[0] == "glue"} == H.GLUE[fam.name]


@pytest.mark.parametrize("window", [4, 9])
def test_varlen_sliding_window_on_cuda(window):
    """PyTorch's varlen_attn with a sliding window (Gemma 3n's sliding layers) against each sample
    alone under a dense windowed mask, in bf16 (relative to the values compared)."""
    import torch.nn.functional as F

    from finetune.kernels import varlen

    torch.manual_seed(0)
    lengths = [37, 5, 19, 18, 1, 30]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    H, D, N = 4, 64, bounds[-1]
    q, k, v = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    out = varlen(q, k, v, cu, max(lengths), causal=True, window=window)
    ref = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(e - s, device="cuda")
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        ref[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None].float(), k[s:e].transpose(0, 1)[None].float(),
                                                  v[s:e].transpose(0, 1)[None].float(),
                                                  attn_mask=mask)[0].transpose(0, 1).to(ref.dtype)
    assert float((out.float() - ref.float()).abs().max()) <= TOL_16BIT * float(ref.float().abs().max())
