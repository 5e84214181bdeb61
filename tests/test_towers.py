"""The media towers in a training step: one attention call per layer however many images,
windows or audio chunks a row holds, and a frozen tower neither builds a graph nor runs again
under gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from media_samples import MIXES, sample
from finetune.models import load_spec


def _loaded(recipe_name, *overrides, checkpointing=False):
    from finetune import adapters, attention
    from finetune.families import family_for
    from finetune.recipe import load_recipe

    recipe = load_recipe(recipe_name, ["model.max_pixels=12544", *overrides])
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    attention.apply_to_llm(loaded.model, "varlen")
    attention.apply_to_encoders(loaded.model, fam)
    model, _ = adapters.apply_roles(loaded.model, fam, recipe, gradient_checkpointing=checkpointing)
    return fam, loaded, model


def _batch(fam, loaded, model, mixes, media_dir):
    from finetune.packing import pack_encoded
    from finetune.verify import to_model

    rope = fam.rope_index(loaded.model)
    rows = [[fam.encode(sample(media_dir, MIXES[m], answer="Yes."), loaded.processor, rope=rope) for m in mixes]]
    return to_model(pack_encoded(fam, rows, loaded.processor.pad_id, with_varlen_args=True,
                                 towers=fam.tower_inputs(loaded.model)), model, fam)


@pytest.mark.parametrize("recipe_name", ["medical-tiny", "medical-baichuan-tiny"])
def test_encoder_attention_calls_do_not_grow_with_the_media_in_a_row(media_dir, recipe_name,
                                                                     monkeypatch):
    from finetune import kernels

    fam, loaded, model = _loaded(recipe_name)
    calls = []
    real = kernels.varlen
    monkeypatch.setattr(kernels, "varlen", lambda *a, **k: calls.append(a[3].numel() - 1) or real(*a, **k))
    import finetune.attention as attention
    import finetune.families.baichuan_audio as baichuan_audio

    monkeypatch.setattr(attention, "varlen", kernels.varlen)
    monkeypatch.setattr(baichuan_audio, "varlen", kernels.varlen)

    def encoder_calls(mixes):
        calls.clear()
        batch = _batch(fam, loaded, model, mixes, media_dir)
        batch.pop("labels")
        with torch.no_grad():
            model(**batch)
        llm_layers = len(fam.submodule(model, "model.language_model.layers" if fam.mrope else "model.layers"))
        return len(calls) - llm_layers, sum(calls)  # encoder calls, and the segments they covered

    few = encoder_calls(["image", "audio", "video"])
    many = encoder_calls(["two_images", "image", "all", "audio", "audio", "two_images", "video"])
    assert few[0] == many[0], (few, many)  # the same number of calls (per layer and media kind) ...
    assert many[1] > few[1]  # ... for more images, windows and chunks


def test_a_frozen_tower_runs_once_under_checkpointing(media_dir):
    """recipes/medical.yaml's roles: frozen encoders, full vision projector, LoRA LLM, with
    checkpointing. The frozen vision blocks run in the forward only (no graph: their input needs
    no gradient) and are not recomputed in backward; the projector above them still learns."""
    fam, loaded, model = _loaded("medical", "model.path=tiny:qwen2_5_omni", "model.min_pixels=3136", checkpointing=True)
    blocks = fam.submodule(model, "model.visual").blocks
    runs = []
    hooks = [b.register_forward_hook(lambda m, a, o: runs.append(torch.is_grad_enabled() and o.requires_grad))
             for b in blocks]
    model.train()
    batch = _batch(fam, loaded, model, ["image", "two_images", "text"], media_dir)
    labels = batch.pop("labels")
    model(**batch, labels=labels).loss.backward()
    for h in hooks:
        h.remove()
    assert len(runs) == len(blocks) and not any(runs), runs  # once each, no graph
    merger = fam.submodule(model, "model.visual.merger")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merger.parameters() if p.requires_grad)
