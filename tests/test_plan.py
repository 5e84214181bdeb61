"""The memory planner: meta-device counts, weight bytes, LoRA counts, activations, the CLI."""

from __future__ import annotations

import pytest

from finetune.models import load_spec
from finetune.plan import GB, format_plan, plan
from finetune.recipe import load_recipe

QWEN = "model.path=config:qwen2_5_omni_7b"
BAICHUAN = "model.path=config:baichuan_omni_1_5"


def _roles(p) -> dict[str, int]:
    return {r.role: r.params for r in p.roles}


def test_tiny_counts_match_the_loaded_model():
    import torch

    from finetune.families import get_family

    recipe = load_recipe("medical-tiny")
    fam = get_family("qwen2_5_omni")
    model = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa")).model
    real: dict[str, int] = {}
    for name, p in model.named_parameters():
        role = fam.role_of(name)
        if role is not None:
            real[role] = real.get(role, 0) + p.numel()
    p = plan(recipe)
    assert _roles(p) == real
    # full roles train all their parameters
    for r in p.roles:
        if r.mode == "full":
            assert r.trainable == r.params


def test_real_configs_total_in_known_range():
    q = plan(load_recipe("medical", [QWEN]))
    total = sum(_roles(q).values())
    assert 8.8e9 < total < 9.05e9  # Qwen2.5-Omni-7B thinker ~8.93B with vision and audio encoders
    assert set(_roles(q)) >= {"llm", "embeddings", "lm_head", "vision_encoder", "vision_projector",
                              "audio_encoder", "audio_projector"}
    b = plan(load_recipe("medical-baichuan", [BAICHUAN]))
    br = _roles(b)
    # /tmp/baichuan_spec.md §5: model.layers + model.norm, vision tower, bridge, audio embeddings
    assert br["llm"] == 6_525_618_176 + 3_584
    assert br["vision_encoder"] == 631_183_360
    assert br["vision_projector"] == 44_575_744
    assert br["audio_projector"] == 69_758_976
    assert br["embeddings"] == br["lm_head"] == 544_997_376
    assert 9.1e9 < sum(br.values()) < 9.4e9  # ~11.02B minus the speech-output parts


def test_shipped_qwen_config_is_the_7b_architecture():
    """The shipped thinker config against transformers' config defaults, which are Qwen2.5-Omni-7B's."""
    import json
    from importlib import resources

    from transformers import Qwen2_5OmniThinkerConfig

    shipped = json.loads((resources.files("finetune") / "configs" / "qwen2_5_omni_7b.json").read_text())
    default = Qwen2_5OmniThinkerConfig()
    # the library's docstring default for the vision width is the LLM's (its out_hidden_size); the
    # released tower is 1280 wide (32 blocks -> the known 675M-parameter ViT with its merger)
    allowed = {("vision_config", "hidden_size"): (1280, 3584),
               ("text_config", "sliding_window"): (32768, None),  # unused: use_sliding_window is false
               ("text_config", "tie_word_embeddings"): (False, True)}  # the thinker has its own lm_head
    for part in ("audio_config", "vision_config", "text_config"):
        ref = getattr(default, part).to_dict()
        for key, value in shipped[part].items():
            if key in ref and ref[key] != value:
                assert allowed.get((part, key)) == (value, ref[key]), (part, key, value, ref[key])
    assert shipped["text_config"]["use_sliding_window"] is False


def test_4bit_is_smaller_and_lora_counts_follow_the_formula():
    bf16 = plan(load_recipe("medical", [QWEN, "roles.llm.r=8"]))
    q4 = plan(load_recipe("medical", [QWEN, "roles.llm.r=8", "model.quantize=4bit"]))
    assert q4.weights < 0.55 * bf16.weights
    llm4 = next(r for r in q4.roles if r.role == "llm")
    llm16 = next(r for r in bf16.roles if r.role == "llm")
    assert llm4.weight_bytes < 0.3 * llm16.weight_bytes
    # encoders, embeddings and lm_head stay in bf16
    for a, b in zip(bf16.roles, q4.roles):
        if a.role != "llm":
            assert a.weight_bytes == b.weight_bytes
    # LoRA on all linear layers of the 28 decoder layers: q, k, v, o, gate, up, down
    h, kv, i, layers, r = 3584, 4 * 128, 18944, 28, 8
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    assert llm16.trainable == llm4.trainable == layers * r * per_layer
    vp = next(x for x in bf16.roles if x.role == "vision_projector")
    assert bf16.trainable_params == layers * r * per_layer + vp.params
    # AdamW: 4 (fp32 copy) + 4 (grad) + 8 bytes; 8-bit: 4 + 4 + 2
    assert bf16.trainable_state == pytest.approx(16 * bf16.trainable_params)
    q8 = plan(load_recipe("medical", [QWEN, "roles.llm.r=8", "train.optim=paged_adamw_8bit"]))
    assert q8.trainable_state == pytest.approx(10 * q8.trainable_params)
    # DDP keeps a whole copy of everything on each GPU; ZeRO-2 shards the trainable state
    ddp = plan(load_recipe("medical", [QWEN, "roles.llm.r=8"]), gpus=2)
    assert ddp.settings.strategy == "ddp" and ddp.trainable_state == pytest.approx(bf16.trainable_state)
    two = plan(load_recipe("medical", [QWEN, "roles.llm.r=8", "train.distributed=deepspeed"]), gpus=2)
    assert two.settings.strategy == "zero2"
    assert two.trainable_state == pytest.approx(bf16.trainable_state / 2)
    assert two.weights == pytest.approx(bf16.weights)


@pytest.mark.parametrize("path", [QWEN, BAICHUAN])
def test_each_strategy_places_weights_and_state_per_rank(path):
    """Per GPU: ZeRO-2 divides the trainable state by N, ZeRO-3/FSDP the weights too (plus what
    is gathered at a time), offload moves the fp32 copies and optimizer states to the host."""
    from finetune.plan import STRATEGIES

    recipe = "medical" if path == QWEN else "medical-baichuan"
    one = plan(load_recipe(recipe, [path]), gpus=1)
    p = {name: plan(load_recipe(recipe, [path, *_setting(name)]), gpus=4) for name in STRATEGIES if name != "single"}
    assert {n for n, *_ in p["ddp"].strategies} == set(STRATEGIES) - {"single"}
    assert p["ddp"].weights == pytest.approx(one.weights) and p["ddp"].trainable_state == pytest.approx(
        one.trainable_state)
    assert p["zero2"].weights == pytest.approx(one.weights)
    assert p["zero2"].trainable_state == pytest.approx(one.trainable_state / 4)
    for name in ("zero3", "fsdp"):
        assert p[name].weights == pytest.approx(one.weights / 4)
        assert 0 < p[name].gathered < one.weights / 4
        assert p[name].peak < p["zero2"].peak < p["ddp"].peak
    trainable = one.trainable_params
    # offload: the GPU keeps the gradient partition (4 B), the host the fp32 copy + AdamW (12 B)
    assert p["zero2-offload"].trainable_state == pytest.approx(4 * trainable / 4)
    assert p["zero2-offload"].host == pytest.approx(12 * trainable / 4)
    assert p["zero3-offload"].weights == 0
    assert p["zero3-offload"].host == pytest.approx(12 * trainable / 4 + one.weights / 4)
    # the table on the plan is the same arithmetic as planning each strategy alone
    table = {n: peak for n, peak, _, _ in p["ddp"].strategies}
    for name, q in p.items():
        assert table[name] == pytest.approx(q.peak), name


def _setting(name: str) -> list[str]:
    if name in ("ddp", "fsdp"):
        return [f"train.distributed={name}"]
    return ["train.distributed=deepspeed", f"train.deepspeed={name}"]


def test_the_plan_says_which_strategy_fits():
    # the 7B thinker with every LLM weight trained does not fit 2 x 24 GB under DDP; sharding does
    p = plan(load_recipe("medical", [QWEN, "roles.llm.mode=full"]), gpu_gb=24, gpus=2)
    assert not p.fits
    fits = {n for n, _, _, ok in p.strategies if ok}
    assert "ddp" not in fits and "zero3-offload" in fits
    assert any("train.deepspeed=zero3" in x for x in p.suggestions), p.suggestions
    out = format_plan(p)
    assert "per GPU under each strategy on 2 x 24 GB (the recipe's: ddp)" in out


def test_encoder_bound_is_a_row_of_media_tokens():
    """Encoders see a whole row's media in one call: the bound grows with data.max_tokens, and
    the tower positions per media token are the families' own token arithmetic."""
    from finetune.families.baichuan_audio import audio_token_count
    from finetune.families.qwen2_5_omni import _feat_to_tokens
    from finetune.plan import count_model, resolve_config

    for path, recipe in ((QWEN, "medical"), (BAICHUAN, "medical-baichuan")):
        small = plan(load_recipe(recipe, [path, "data.max_tokens=2048"])).encoders
        large = plan(load_recipe(recipe, [path, "data.max_tokens=4096"])).encoders
        assert large == pytest.approx(2 * small)
    # 30 s of audio: 1500 tower frames (3000 mel frames, stride-2 conv) per family's token count
    q = count_model(*resolve_config(QWEN.split("=", 1)[1]))[1]
    b = count_model(*resolve_config(BAICHUAN.split("=", 1)[1]))[1]
    assert q.frames_per_audio_token * _feat_to_tokens(3000) == 1500
    assert b.frames_per_audio_token * audio_token_count(30 * 16000) == 1500
    assert q.patches_per_token == b.patches_per_token == 4


def test_checkpointing_lowers_activations():
    on = plan(load_recipe("medical", [QWEN, "train.gradient_checkpointing=true"]))
    off = plan(load_recipe("medical", [QWEN, "train.gradient_checkpointing=false"]))
    assert on.activations < off.activations / 5
    assert on.peak < off.peak
    assert off.activations_ckpt == on.activations_ckpt and off.activations_full == on.activations_full
    # activations scale with the token budget; logits are tokens x vocab x 4
    half = plan(load_recipe("medical", [QWEN, "data.max_tokens=2048", "train.gradient_checkpointing=false"]))
    assert half.activations == pytest.approx(off.activations / 2)
    assert off.logits == 4096 * 152064 * 4


def test_the_method_is_planned_dpo_adds_the_reference_grpo_the_answers_and_their_generation():
    """DPO: the pairs share the rows, so only the reference's forward (one layer's activations, no
    gradients) comes on top. GRPO: G answers per prompt fill up to batch x G rows (activations and
    logits scale by G) and generation keeps their KV cache (2 x the K projection's width x 16-bit
    per token and layer), which is not alive beside the activations."""
    common = [QWEN, "data.max_tokens=4096", "roles.vision_projector.mode=frozen"]
    sft = plan(load_recipe("medical", common))
    dpo = plan(load_recipe("medical", [*common, "train.method=dpo"]))
    grpo = plan(load_recipe("medical", [*common, "train.method=grpo", "train.grpo_group=4"]))
    assert sft.reference == 0 and sft.generation == 0
    assert dpo.activations == sft.activations and dpo.logits == sft.logits
    assert dpo.reference > 0 and dpo.peak == pytest.approx(sft.peak + dpo.reference)
    assert grpo.activations == pytest.approx(4 * sft.activations) and grpo.logits == 4 * sft.logits
    # Qwen2.5-Omni 7B: 28 layers, 4 KV heads of 128 -> K projection 512 wide
    assert grpo.generation == pytest.approx(4 * 4096 * 28 * 2 * 512 * 2)
    step = grpo.activations + grpo.logits + grpo.encoders + grpo.reference
    assert grpo.peak == pytest.approx(grpo.weights + grpo.trainable_state + max(step, grpo.generation) + grpo.overhead)
    out = format_plan(grpo)
    assert "x 4 answers (GRPO)" in out and "generation cache (GRPO)" in out and "reference forward (GRPO)" in out
    assert "reference forward (DPO)" in format_plan(dpo)


def test_suggestions_when_it_does_not_fit():
    p = plan(load_recipe("medical", [QWEN, "train.gradient_checkpointing=false"]), gpu_gb=24)
    assert not p.fits and p.peak > 24 * GB
    text = "\n".join(p.suggestions)
    assert "model.quantize=4bit" in text and "train.gradient_checkpointing=true" in text
    assert "train.optim=paged_adamw_8bit" in text and "data.max_tokens=" in text
    out = format_plan(p)
    assert "fits on 1 x 24 GB: NO" in out and "to make it fit" in out


def test_cli_prints_a_table(capsys):
    from finetune.cli import main

    rc = main(["plan", "medical-qlora", QWEN, "--gpu", "24GB", "--gpus", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "role" in out and "grad+optim" in out and "expected peak" in out
    assert "vision_projector  full" in out and "fits on 1 x 24 GB: yes" in out


def test_unknown_shipped_config():
    with pytest.raises(FileNotFoundError, match="config:qwen2_5_omni_7b"):
        plan(load_recipe("medical", ["model.path=config:nope"]))


def test_a_local_folder_is_read_from_its_config_json(tmp_path):
    import shutil

    from finetune.plan import CONFIG_DIR

    shutil.copy(CONFIG_DIR / "baichuan_omni_1_5.json", tmp_path / "config.json")
    a = plan(load_recipe("medical-baichuan-qlora", [f"model.path={tmp_path}"]))
    b = plan(load_recipe("medical-baichuan-qlora", [BAICHUAN]))
    assert a.family == "baichuan_omni" and a.peak == b.peak and _roles(a) == _roles(b)
