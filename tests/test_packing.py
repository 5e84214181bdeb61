"""Packing: bin planning, and packed == one-by-one (logits, loss, gradients) for every mix."""

from __future__ import annotations

import random

import pytest
import torch

from media_samples import MIXES, sample

from finetune.models import load_spec
from finetune.packing import efficiency, plan_bins
from finetune.verify import compare_packed, perturb_lora_b


def test_bfd_places_every_sample_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(5, 900) for _ in range(500)]
    bins = plan_bins(lengths, 1024)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    lower = -(-sum(lengths) // 1024)
    assert len(bins) <= lower * 1.05 + 1
    assert efficiency(lengths, bins, 1024) > 0.94
    assert plan_bins(lengths, 1024) == bins  # deterministic


def test_sample_over_budget_is_refused():
    with pytest.raises(ValueError, match="sample 1 has 300 tokens"):
        plan_bins([10, 300], 256)


@pytest.fixture(scope="module")
def trainable_tiny():
    """The tiny thinker with LoRA on the LLM and vision encoder, full projectors and lm_head."""
    from finetune import adapters
    from finetune.families import get_family
    from finetune.recipe import load_recipe

    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", ["model.max_pixels=12544", "roles.vision_encoder.mode=lora",
                                          "roles.audio_encoder.mode=lora", "roles.audio_projector.mode=full",
                                          "roles.vision_projector.mode=full", "roles.lm_head.mode=full"])
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    return fam, loaded, model


CASES = {
    "text": ["text", "text"],
    "image": ["image", "image"],
    "audio": ["audio", "text"],
    "video": ["video", "text"],
    "image+audio": ["all", "image"],
    "several_images": ["two_images", "image"],
    "everything": ["text", "image", "audio", "video", "two_images", "all"],
}


PIPELINES = {"sdpa": {}, "training": {"packed_attn": "varlen", "varlen_args": True, "towers": True}}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_one_by_one(trainable_tiny, media_dir, case, pipeline):
    """`training`: the packed pass as training runs it: the LLM on varlen with the collator's
    boundaries, the towers' inputs from the collator and their attention one varlen call per
    layer; against each sample alone on the model's own SDPA paths (the encoders here train
    LoRA, so their gradients are compared too)."""
    fam, loaded, model = trainable_tiny
    samples = [sample(media_dir, MIXES[m], answer=f"Yes. Case {i} {m}.") for i, m in enumerate(CASES[case])]
    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                         **PIPELINES[pipeline])
    assert res.n_rows == 1  # everything in one row: samples really share it
    assert res.max_logit_diff <= 1e-5, res.format()
    assert res.loss_diff <= 1e-5, res.format()
    assert res.max_grad_diff <= 1e-5, res.format()
    assert res.passed


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_rows_padded_to_the_same_length_stay_isolated(trainable_tiny, media_dir, backend):
    fam, loaded, model = trainable_tiny
    samples = [sample(media_dir, MIXES[m], answer="No.") for m in ("image", "text", "audio", "text")]
    # a budget that forces two rows of different lengths -> the shorter row gets a padding segment
    lens = [fam.encode(s, loaded.processor).num_tokens for s in samples]
    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model),
                         max_tokens=max(lens[0] + lens[1], lens[2] + lens[3]) + 1, packed_attn=backend,
                         varlen_args=backend == "varlen")
    assert res.n_rows >= 2
    assert res.passed, res.format()


@pytest.mark.parametrize("breakage", ["no_text_row", "all_ones_mask"])
def test_the_exactness_check_catches_broken_isolation(trainable_tiny, media_dir, breakage):
    fam, loaded, model = trainable_tiny
    samples = [sample(media_dir, MIXES[m], answer="Yes. Broken.") for m in ("image", "text", "audio")]

    def mutate(batch):
        if breakage == "no_text_row":
            batch["position_ids"] = batch["position_ids"][1:]
        else:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                         mutate=mutate)
    assert not res.passed
    assert res.max_logit_diff > 1e-3


@pytest.mark.parametrize("varlen_args", [False, True], ids=["bounds_from_positions", "cu_seq_lens"])
def test_varlen_backend_matches_one_by_one(trainable_tiny, media_dir, varlen_args):
    from finetune import attention

    fam, loaded, model = trainable_tiny
    samples = [sample(media_dir, MIXES[m], answer="Yes. Varlen.") for m in ("image", "text", "audio", "all")]
    attention.apply_to_llm(loaded.model, "varlen")
    before = attention.segment_calls
    try:
        res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                             varlen_args=varlen_args)
    finally:
        attention.apply_to_llm(loaded.model, "sdpa")
    assert attention.segment_calls > before  # the packed forward really went through varlen
    assert res.passed, res.format()


def test_the_sync_free_cpu_kernel_is_exact_too(trainable_tiny, media_dir, monkeypatch):
    """The dense kernel (segments from cu_seqlens on the device, one masked SDPA), which the
    host-sync test runs in place of CUDA's varlen kernel, gives the same logits and gradients."""
    from finetune import kernels

    monkeypatch.setattr(kernels, "CPU_KERNEL", "dense")
    fam, loaded, model = trainable_tiny
    samples = [sample(media_dir, MIXES[m], answer=f"Yes. Case {i} {m}.") for i, m in enumerate(CASES["everything"])]
    res = compare_packed(model, fam, loaded.processor, samples, fam.rope_index(loaded.model), max_tokens=4096,
                         **PIPELINES["training"])
    assert res.passed, res.format()


def test_idle_media_run_every_tower_and_change_nothing(trainable_tiny, media_dir):
    """Under sharded weights a batch without audio (or video) gets an idle sample that brings it
    (packing.idle_media): the tower runs, and the loss and every gradient stay what they were."""
    from finetune.packing import PackedCollator, idle_media
    from finetune.loss import shifted_cross_entropy as _sum_loss
    from finetune.probes import to_model

    fam, loaded, model = trainable_tiny
    model.eval()
    rope = fam.rope_index(loaded.model)
    pool = [sample(media_dir, MIXES[m], answer=f"Yes. Pool {m}.") for m in ("text", "image", "all", "audio", "video")]
    lengths = [fam.encode(s, loaded.processor, rope=rope).num_tokens for s in pool]
    idle = idle_media(fam, loaded.processor, pool, lengths, rope)
    # the shortest sample with the fewest kinds stands for each kind: image-only, audio-only, video-only
    assert sorted(tuple(sorted(k for k, key in fam.media_keys.items() if key in e.media)) for e in idle) == [
        ("audio",), ("image",), ("video",)]
    assert all((e.labels == -100).all() for e in idle)

    train = [sample(media_dir, MIXES["text"], answer="No. Plain."), sample(media_dir, MIXES["image"], answer="Yes.")]
    calls = []
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
             for name, m in (("audio", loaded.model.model.audio_tower), ("vision", loaded.model.model.visual))]

    def step(with_idle):
        col = PackedCollator(fam, loaded.processor, train, rope, idle=idle if with_idle else [])
        batch = col([{"bin": [0, 1]}])
        assert batch["num_real_tokens"] == sum(fam.encode(s, loaded.processor).num_tokens for s in train)
        labels = batch.pop("labels")[0]
        batch.pop("num_real_tokens")
        model.zero_grad()
        calls.clear()
        loss = _sum_loss(model(**to_model(batch, model, fam)).logits[0], labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss), grads, list(calls), batch

    try:
        loss0, grads0, calls0, _ = step(False)
        loss1, grads1, calls1, batch1 = step(True)
    finally:
        for h in hooks:
            h.remove()
    assert calls0 == ["vision"]
    assert sorted(calls1) == ["audio", "vision", "vision"]  # images, then the idle video; the idle audio
    assert "input_features" in batch1 and "pixel_values_videos" in batch1
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0))
    for n, g in grads0.items():
        assert float((grads1[n] - g).abs().max()) <= 1e-5, n
    for n, g in grads1.items():  # the towers the idle samples ran get exact zeros where nothing else reached
        if n not in grads0:
            assert float(g.abs().max()) == 0.0, n
