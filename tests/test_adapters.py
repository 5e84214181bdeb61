"""Per-role trainability, LoRA targeting, per-role rank and lr, QLoRA on the LLM only."""

from __future__ import annotations

import pytest
import torch

from finetune.models import load_spec
from finetune import adapters
from finetune.families import get_family
from finetune.families.base import ROLE_NAMES
from finetune.recipe import load_recipe


def fresh(overrides=(), quantize=None):
    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", list(overrides))
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa", quantize=quantize))
    return fam, recipe, loaded


def all_frozen_except(extra):
    return [f"roles.{r}.mode=frozen" for r in ROLE_NAMES if r not in extra]


def trainable_roles(model, fam):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(fam.role_of(n), []).append(n)
    return out


def test_every_parameter_has_a_role():
    fam, _, loaded = fresh()
    missing = [n for n, _ in loaded.model.named_parameters() if fam.role_of(n) is None]
    assert missing == []
    assert fam.role_of("model.visual.merger.mlp.0.weight") == "vision_projector"
    assert fam.role_of("model.visual.blocks.0.attn.q.weight") == "vision_encoder"
    assert fam.role_of("model.audio_tower.proj.weight") == "audio_projector"
    assert fam.role_of("model.audio_tower.layers.0.fc1.weight") == "audio_encoder"
    assert fam.role_of("model.language_model.embed_tokens.weight") == "embeddings"
    assert fam.role_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "llm"


def test_lora_llm_only_trains_only_lora_of_the_llm():
    fam, recipe, loaded = fresh(all_frozen_except(["llm"]))
    model, plan = adapters.apply_roles(loaded.model, fam, recipe)
    tr = trainable_roles(model, fam)
    assert set(tr) == {"llm"}
    assert all(".lora_A." in n or ".lora_B." in n for n in tr["llm"])
    # one A and one B per linear layer of every decoder layer (7 linears x 2 layers)
    assert len(tr["llm"]) == 2 * 7 * 2


def test_full_roles_train_every_weight_of_the_role():
    fam, recipe, loaded = fresh(all_frozen_except(["llm", "vision_projector", "lm_head"]) +
                                ["roles.vision_projector.mode=full", "roles.lm_head.mode=full"])
    n_merger = sum(p.numel() for n, p in loaded.model.named_parameters() if n.startswith("model.visual.merger"))
    model, plan = adapters.apply_roles(loaded.model, fam, recipe)
    tr = trainable_roles(model, fam)
    assert set(tr) == {"llm", "vision_projector", "lm_head"}
    got = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and fam.role_of(n) == "vision_projector")
    assert got == n_merger
    # the vision encoder around the projector stays frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if fam.role_of(n) == "vision_encoder")
    rows = {r["role"]: r for r in adapters.role_table(model, fam, plan)}
    assert rows["vision_projector"]["trainable"] == rows["vision_projector"]["total"] == n_merger
    assert rows["audio_encoder"]["trainable"] == 0


def test_lora_targets_by_name_and_rank_per_role():
    fam, recipe, loaded = fresh(all_frozen_except(["llm", "vision_encoder"]) +
                                ["roles.llm.targets=[q_proj,v_proj]", "roles.llm.r=8",
                                 "roles.vision_encoder.mode=lora", "roles.vision_encoder.r=4",
                                 "roles.vision_encoder.targets=[q,v]"])
    model, plan = adapters.apply_roles(loaded.model, fam, recipe)
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj") for n in plan.lora_targets["llm"])
    assert len(plan.lora_targets["llm"]) == 4
    shapes = {n: p.shape for n, p in model.named_parameters() if ".lora_A." in n}
    llm_a = [s for n, s in shapes.items() if "language_model" in n]
    vis_a = [s for n, s in shapes.items() if "visual" in n]
    assert llm_a and all(s[0] == 8 for s in llm_a)
    assert vis_a and all(s[0] == 4 for s in vis_a)


def test_targets_that_match_nothing_are_an_error():
    fam, recipe, loaded = fresh(["roles.llm.targets=[nonexistent_proj]"])
    with pytest.raises(ValueError, match="matches no linear"):
        adapters.apply_roles(loaded.model, fam, recipe)


def test_role_learning_rates_become_optimizer_groups():
    fam, recipe, loaded = fresh(all_frozen_except(["llm", "vision_projector"]) +
                                ["roles.vision_projector.mode=full", "roles.vision_projector.lr=1e-5",
                                 "train.lr=3e-4"])
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    groups = adapters.role_param_groups(model, fam, recipe, weight_decay=0.0)
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert set(by_lr) == {3e-4, 1e-5}
    n_merger = sum(p.numel() for n, p in model.named_parameters()
                   if p.requires_grad and fam.role_of(n) == "vision_projector")
    assert by_lr[1e-5] == n_merger


def test_qlora_quantizes_exactly_the_llm_linear_layers():
    fam, recipe, loaded = fresh(quantize="4bit")
    quantized, plain = set(), set()
    for n, m in loaded.model.named_modules():
        kind = type(m).__name__
        if kind == "Linear4bit":
            quantized.add(n)
        elif isinstance(m, torch.nn.Linear):
            plain.add(n)
    llm_linears = {n for n in quantized | plain if fam.role_of(n) == "llm"}
    assert quantized == llm_linears and len(quantized) == 14
    assert all(fam.role_of(n) != "llm" for n in plain)
    # encoders and projectors keep the compute dtype
    for n, p in loaded.model.named_parameters():
        if fam.role_of(n) in ("vision_encoder", "vision_projector", "audio_encoder", "lm_head"):
            assert p.dtype == torch.float32, n
    model, plan = adapters.apply_roles(loaded.model, fam, recipe)
    rows = {r["role"]: r for r in adapters.role_table(model, fam, plan)}
    assert "4bit" in rows["llm"]["dtype"]
    assert rows["llm"]["total"] == sum(p.numel() for n, p in fresh()[2].model.named_parameters()
                                       if fam.role_of(n) == "llm")


def test_a_4bit_model_loaded_for_training_still_trains_after_an_inference_forward():
    """bitsandbytes repacks a Linear4bit for CPU inference on its first eval-mode forward without
    grad where the CPU has AVX-512 BF16, and a training forward then fails; the checks before
    step 1 make such a forward. (Where the CPU lacks AVX-512 BF16 nothing is repacked either way.)"""
    from finetune.trainer import load_for_training

    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", ["model.quantize=4bit"])
    loaded = load_for_training(recipe, fam, "fp32")
    four_bit = [m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_audio_head_cannot_be_trained():
    from finetune.recipe import RecipeError

    with pytest.raises(RecipeError, match="audio_head"):
        load_recipe("medical-tiny", ["roles.audio_head.mode=lora"])
