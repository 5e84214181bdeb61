"""The Family contract, checked on every registered family (`finetune.families._registry()`).

A new family gets every check here by its registry line alone: its tiny model is
`tiny:<name>` (medical-tiny with model.path swapped), its modality mixes are those of
`MIXES` whose media kinds are keys of `family.media_keys`, and its shipped config is the file
of `Family.shipped_configs` (each checked to be of the family's model_type). Each family's
tiny model is loaded once per module (twice: as loaded, and with roles applied for training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from media_samples import greedy_without_cache

from finetune.families import _registry, get_family, model_types
from finetune.families.base import ROLE_NAMES, LoadedModel, Processor, Stack, TowerShapes, strip_peft_prefix
from finetune.models import load_spec, processor_of

from media_samples import MIXES, sample

FAMILIES = sorted(_registry())
KINDS = ("image", "audio", "video")


def recipe_for(name: str, *overrides: str):
    """medical-tiny on `tiny:<name>` (a family's tiny model or one of its tiny variants)."""
    from finetune.recipe import load_recipe

    return load_recipe("medical-tiny", [f"model.path=tiny:{name}", "model.max_pixels=12544", *overrides])


def kinds_of(mix: str) -> set[str]:
    return {p["type"] for p in MIXES[mix]} - {"text"}


def kinds_read(family, mix: str) -> set[str]:
    """The media kinds the family reads from a mix: a video read with its sound adds audio."""
    sound = any(p.get("use_audio_in_video") for p in MIXES[mix])
    return kinds_of(mix) | ({"audio"} if sound and family.audio_in_video else set())


def mixes_of(family) -> list[str]:
    """The modality mixes this family can take: only media kinds it has."""
    return [m for m in sorted(MIXES) if kinds_of(m) <= set(family.media_keys)]


def skipped_by_quant(name: str, skip) -> bool:
    """bitsandbytes' skip rule, as finetune/plan.py counts it."""
    return any(name == k or name.startswith(k + ".") or ("." + k) in name for k in skip)


def training_roles(family, model) -> list[str]:
    """Every role the model has set to train: LoRA on the LLM and the encoders, the projectors
    and lm_head in full (so that packing is checked through every trainable path)."""
    want = {"llm": "lora", "vision_encoder": "lora", "audio_encoder": "lora", "vision_projector": "full",
            "audio_projector": "full", "lm_head": "full"}
    present = set(family.present_roles(model))
    return [f"roles.{r}.mode={want.get(r, 'frozen') if r in present else 'frozen'}" for r in ROLE_NAMES]


# ---- fixtures: one family per module-scoped parameter ---------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return get_family(request.param)


@pytest.fixture(scope="module")
def loaded(family):
    """The family's tiny model in float32 on SDPA, eval mode."""
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    out = family.load(load_spec(recipe_for(family.name), dtype=torch.float32, attn="sdpa"))
    out.model.eval()
    return out


@pytest.fixture(scope="module")
def trainable(family):
    """(loaded, PEFT model) with every present role trained and LoRA B perturbed."""
    from finetune import adapters
    from finetune.verify import perturb_lora_b

    ld = family.load(load_spec(recipe_for(family.name), dtype=torch.float32, attn="sdpa"))
    recipe = recipe_for(family.name, *training_roles(family, ld.model))
    model, _ = adapters.apply_roles(ld.model, family, recipe)
    perturb_lora_b(model, 0.05)
    return ld, model


# ---- 1. loading -----------------------------------------------------------------------------
def test_tiny_model_loads(family, loaded):
    assert family.name in FAMILIES and family.model_types and family.title
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, torch.nn.Module)
    cfg = family.read_config(loaded.base_path)  # a folder of this family's own
    assert cfg["model_type"] in family.model_types
    assert model_types()[cfg["model_type"]] == family.name
    assert set(family.media_keys) <= set(KINDS) and family.media_keys
    assert set(family.role_prefixes) <= set(ROLE_NAMES)
    proc = loaded.processor
    assert isinstance(proc, Processor)  # what the package outside the family uses of it
    assert isinstance(proc.pad_id, int) and isinstance(proc.eos_id, int)
    assert proc.tokenizer.decode([proc.eos_id])  # the tokenizer knows its own special tokens
    settings = proc.settings()
    assert isinstance(settings, dict) and settings
    json.dumps(settings)  # keys the token-length cache: must serialise


def test_tiny_models_are_built_apart_from_the_family_file(family, loaded):
    """The builders `tiny_models()` names live in the family's `<family>_tiny` module, and the one
    named as the family is the folder `tiny:<family>` loads."""
    builders = family.tiny_models()
    assert family.name in builders
    assert {b.__module__ for b in builders.values()} == {f"finetune.families.{family.name}_tiny"}
    assert family.materialize_tiny(0) == loaded.base_path


def test_tower_shapes_are_typed(family, loaded):
    """`tower_shapes` of the model's config: a Stack for the LLM and for each tower the family has
    (positive sizes), the vocabulary the embeddings hold, positive positions per media token."""
    shapes = family.tower_shapes(loaded.model.config)
    assert isinstance(shapes, TowerShapes)
    for stack, present in ((shapes.llm, True), (shapes.vision, "image" in family.media_keys),
                           (shapes.audio, "audio" in family.media_keys)):
        assert isinstance(stack, Stack) if present else stack is None
        if present:
            assert all(isinstance(x, int) and x > 0 for x in stack[:4]) and isinstance(stack.gated, bool)
    assert shapes.vocab == loaded.model.get_input_embeddings().num_embeddings
    assert shapes.patches_per_token > 0 and shapes.frames_per_audio_token > 0


def test_modalities_are_declared_and_others_refused_at_their_line(family, loaded, media_dir):
    """`Family.modalities`: the media kinds the model takes, one per tower call (media_keys); a
    sample with any other kind is a located error before training, whose fix names the part."""
    from finetune.data.samples import modality_errors, problems_of

    assert isinstance(family.modalities, frozenset) and family.modalities
    assert family.modalities <= set(KINDS) and family.modalities == set(family.media_keys)
    cfg = family.read_config(loaded.base_path)
    for kind in KINDS:
        s = sample(media_dir, MIXES[kind])
        if kind in family.modalities:
            assert modality_errors(s, family) == []
            continue
        _, errors = problems_of(s, family, loaded.processor, cfg, family.rope_index(loaded.model), None)
        assert [e.kind for e in errors] == ["modality"], errors
        e = errors[0]
        assert (e.file, e.line, e.field) == ("t.jsonl", 1, "messages[1].content[0]")
        assert f"not {kind}" in e.problem and f"remove the {kind} part" in e.fix


# ---- 2. roles -------------------------------------------------------------------------------
def test_every_parameter_has_exactly_one_role(family, loaded, trainable):
    # the longest matching prefix wins: two roles listing the same prefix would be ambiguous
    prefixes = [p for ps in family.role_prefixes.values() for p in ps]
    assert len(prefixes) == len(set(prefixes)), "a module prefix is listed under two roles"
    roles = {n: family.role_of(n) for n, _ in loaded.model.named_parameters()}
    assert [n for n, r in roles.items() if r is None] == []
    assert set(roles.values()) <= set(ROLE_NAMES)
    present = family.present_roles(loaded.model)
    assert {"llm", "embeddings", "lm_head"} <= set(present)
    # the family's media kinds each have an encoder
    for kind, enc in (("image", "vision_encoder"), ("video", "vision_encoder"), ("audio", "audio_encoder")):
        if kind in family.media_keys:
            assert enc in present, (kind, enc)
    # under PEFT (LoRA layers, modules_to_save copies) each name keeps its base module's role
    _, model = trainable
    base_roles = set(roles.values())
    for n, _ in model.named_parameters():
        r = family.role_of(n)
        assert r in base_roles, n
        if ".lora_" not in n and ".modules_to_save." not in n:
            assert r == roles[strip_peft_prefix(n)], n


# ---- 3. token counts from metadata ----------------------------------------------------------
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_count_tokens_equals_the_encoded_length(family, loaded, media_dir, mix):
    missing = kinds_of(mix) - set(family.media_keys)
    if missing:
        pytest.skip(f"{family.name} has no {', '.join(sorted(missing))} input")
    s = sample(media_dir, MIXES[mix])
    enc = family.encode(s, loaded.processor, rope=family.rope_index(loaded.model))
    assert family.count_tokens(s, loaded.processor) == enc.num_tokens
    assert enc.labels.shape == enc.input_ids.shape and enc.num_label_tokens > 0
    assert enc.labels[0] == -100  # the first label of every sample is ignored (packing relies on it)
    assert enc.position_ids.shape[-1] == enc.num_tokens
    assert enc.position_ids.dim() == (2 if family.mrope else 1)
    assert {k for k in family.media_keys if family.media_keys[k] in enc.media} == kinds_read(family, mix)
    assert family.check_encoded(enc, family.read_config(loaded.base_path), planned=enc.num_tokens) == []
    # media tensors that are floating point follow the model's dtype (verify.to_model, probes)
    batch = family.collate_padded([enc], loaded.processor.pad_id)
    for kind in kinds_of(mix):
        v = batch[family.media_keys[kind]]
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert family.media_keys[kind] in family.float_media, kind


# ---- 4. packed == one by one ----------------------------------------------------------------
PIPELINES = {"sdpa": {}, "training": {"packed_attn": "varlen", "varlen_args": True, "towers": True}}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_packed_equals_one_by_one_on_every_mix(family, trainable, media_dir, pipeline):
    """Every modality mix the family has, in one packed row: per-token logits, loss and every
    trainable parameter's gradient as each sample alone, in float32 within 1e-5. `training`
    runs the packed pass as training does (varlen LLM, tower inputs from the collator)."""
    from finetune.verify import compare_packed

    ld, model = trainable
    mixes = mixes_of(family)
    samples = [sample(media_dir, MIXES[m], answer=f"Yes. Case {i} {m}.") for i, m in enumerate(mixes)]
    res = compare_packed(model, family, ld.processor, samples, family.rope_index(ld.model), max_tokens=8192,
                         **PIPELINES[pipeline])
    assert res.n_rows == 1  # the samples really share a row
    assert res.max_logit_diff <= 1e-5, res.format()
    assert res.loss_diff <= 1e-5, res.format()
    assert res.max_grad_diff <= 1e-5, res.format()
    assert res.grad_scale > 0  # gradients were compared, not zeros
    assert res.passed


def test_the_packing_check_catches_a_row_without_isolation(family, trainable, media_dir):
    """The comparison above is not vacuous: a packed row under an all-ones mask (samples
    attending to each other) fails it."""
    from finetune.verify import compare_packed

    ld, model = trainable
    samples = [sample(media_dir, MIXES[m], answer="Yes. Broken.") for m in mixes_of(family)[:3]]

    def all_ones_mask(batch):
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    res = compare_packed(model, family, ld.processor, samples, family.rope_index(ld.model), max_tokens=8192,
                         mutate=all_ones_mask)
    assert not res.passed and res.max_logit_diff > 1e-3


# ---- 5. QLoRA -------------------------------------------------------------------------------
def test_qlora_quantizes_exactly_the_llm_linear_layers(family):
    from finetune.plan import count_model

    recipe = recipe_for(family.name)
    q = family.load(load_spec(recipe, dtype=torch.float32, attn="sdpa", quantize="4bit"))
    quantized, plain = {}, set()
    for n, m in q.model.named_modules():
        if type(m).__name__ == "Linear4bit":
            quantized[n] = m
        elif isinstance(m, torch.nn.Linear):
            plain.add(n)
    assert quantized
    assert {n: family.role_of(n) for n in quantized if family.role_of(n) != "llm"} == {}
    llm_linears = {n for n in plain | set(quantized) if family.role_of(n) == "llm"}
    assert {n for n in llm_linears if not skipped_by_quant(n, family.quant_skip)} == set(quantized)
    assert {n for n in llm_linears if skipped_by_quant(n, family.quant_skip)} == set(), \
        "quant_skip leaves some of the LLM's linear layers unquantised"
    for n, p in q.model.named_parameters():  # encoders, projectors, embeddings, lm_head: compute dtype
        if family.role_of(n) != "llm":
            assert p.dtype == torch.float32, n
    # the planner's count of quantisable weights is what loading quantised
    _, count = count_model(family.name, q.base_path / "config.json")
    assert set(count.quantisable) == {"llm"}
    assert count.quantisable["llm"][0] == sum(m.in_features * m.out_features for m in quantized.values())


# ---- 6. export round trip -------------------------------------------------------------------
VARIANTS = [(f, v) for f in FAMILIES for v in get_family(f).tiny_models()]


@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[v for _, v in VARIANTS])
def test_export_round_trip(tmp_path, small_demo, name, variant):
    """A run folder (resolved recipe + PEFT adapter with perturbed LoRA B, no training steps)
    exported as training's would be: verified, same tensor names as the base, the parts the
    toolkit does not train bit-identical, the reloaded export's logits the adapter model's."""
    from finetune import adapters
    from finetune.checkpoint import raw_equal, tensors_of
    from finetune.data.reading import read_split
    from finetune.export import export_run
    from finetune.probes import pick_probes, probe_logits
    from finetune.recipe import save_resolved
    from finetune.runfolder import lock_run, save_adapter, unlock_run
    from finetune.verify import perturb_lora_b

    fam = get_family(name)
    recipe = recipe_for(variant, f"data.train={small_demo['train']}", f"data.eval={small_demo['eval']}", "data.demo=",
                        f"output.dir={tmp_path / 'run'}", "export.dtype=float32")
    ld = fam.load(load_spec(recipe, quantize="none", dtype=torch.float32, attn="sdpa"))
    # tensors the trainable model writes (in the checkpoint's layout: transformers saves fused MoE
    # experts one tensor per expert, as released checkpoints hold them)
    ld.model.save_pretrained(str(tmp_path / "held"))
    n_model = len(tensors_of(tmp_path / "held"))
    model, _ = adapters.apply_roles(ld.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    run = recipe.run_dir
    lock_run(run)  # the run folder is made (and marked as ours) as training makes it
    save_resolved(recipe, run / "recipe.yaml")
    save_adapter(model, fam, ld, run / "adapter")

    out = export_run(run, fmt="merged")["merged"]
    unlock_run(run)
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["family"] == name
    assert manifest["verify"]["passed"] and manifest["verify"]["max_abs_diff"] <= 1e-4
    kept = manifest["unchanged_from_base"]
    assert kept["bit_identical"]
    base_t, out_t = tensors_of(ld.base_path), tensors_of(out)
    assert base_t.keys() == out_t.keys()  # the base's layout, nothing dropped or added
    changed = [k for k in base_t if not raw_equal(base_t[k], out_t[k])]
    assert changed  # the adapter really moved the model
    assert len(changed) <= len(base_t) - kept["tensors"]
    # every base tensor the trainable model does not hold (speech output, ...) is copied unchanged
    assert kept["tensors"] >= len(base_t) - n_model
    assert fam.read_config(out)["model_type"] == fam.read_config(ld.base_path)["model_type"]

    # independently of the manifest: the export reloaded from disk answers as base + adapter
    samples, _ = read_split(recipe.data.eval, recipe)
    probes = pick_probes(samples)
    rope = fam.rope_index(ld.model)
    ref = probe_logits(model, fam, ld.processor, probes, rope)
    got = probe_logits(fam.load_merged_for_check(out, torch.float32), fam, ld.processor, probes, rope)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= 1e-4


# ---- 7. generation --------------------------------------------------------------------------
def test_batched_generation_on_mixed_modalities(family, loaded, media_dir):
    """A left-padded batch of every mix the family has, with the KV cache, answers what a
    cache-free greedy loop answers for each prompt alone."""
    from finetune.probes import generate

    proc, model = loaded.processor, loaded.model
    rope = family.rope_index(model)
    mixes = mixes_of(family)
    samples = [sample(media_dir, MIXES[m]) for m in mixes]
    n = 4
    got = generate(model, family, proc, samples, rope, max_new_tokens=n, batch_size=len(samples))
    assert len(got) == len(samples)
    for mix, s, text in zip(mixes, samples, got):
        ref = greedy_without_cache(model, family, proc, s, rope, n)
        assert text == proc.tokenizer.decode(ref, skip_special_tokens=True).strip(), mix


# ---- 8. plan on the shipped config ----------------------------------------------------------
def test_plan_on_the_shipped_config(family, loaded):
    from finetune.plan import CONFIG_DIR, plan
    from finetune.recipe import load_recipe

    shipped = [Path(f).stem for f in family.shipped_configs]
    assert shipped, f"{family.name} ships no config for `plan` (Family.shipped_configs)"
    for f in family.shipped_configs:  # each is a released model of this family
        assert model_types().get(json.loads((CONFIG_DIR / f).read_text()).get("model_type")) == family.name, f
    for stem in shipped:
        p = plan(load_recipe("medical-tiny", [f"model.path=config:{stem}"]))
        assert p.family == family.name
        assert p.peak > 0 and p.weights > 0 and p.trainable_params > 0
        # the real architecture has the roles the tiny one has
        assert {r.role for r in p.roles if r.params} == set(family.present_roles(loaded.model))


# ---- 9. audio past the processor's limit; a video's own sound --------------------------------
def test_audio_limit_and_video_sound_are_declared(family, loaded, media_dir):
    """`max_audio_samples` and `audio_in_video` (Family): a clip one sample past the limit is a
    located error by default, the processor's own cut under `truncate` and consecutive clips under
    `split`, each counted from metadata as encoded; without a limit a clip longer than 300 s (where
    a Whisper feature extractor left at its defaults would cut) is read whole. A video's sound is
    read where the family takes it, and use_audio_in_video is refused where it does not."""
    import dataclasses

    import numpy as np
    import soundfile as sf

    from finetune.data.schema import DataError
    from finetune.errors import ConfigError

    proc = loaded.processor
    config = family.read_config(loaded.base_path)
    assert isinstance(family.audio_in_video, bool)
    assert not family.audio_in_video or {"audio", "video"} <= set(family.media_keys)
    assert proc.long_audio == "error" and proc.settings()["long_audio"] == "error"
    assert isinstance(proc.sampling_rate, int)
    limit = family.max_audio_samples(proc)
    assert limit is None or (isinstance(limit, int) and limit > 0)

    def clip(n):
        sf.write(media_dir / f"clip{n}.wav", (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32),
                 proc.sampling_rate, subtype="FLOAT")
        return sample(media_dir, [{"type": "audio", "path": f"clip{n}.wav"}, {"type": "text", "text": "Listen."}])

    def encoded(s, p):
        enc = family.encode(s, p, rope=family.rope_index(loaded.model))
        assert family.count_tokens(s, p) == enc.num_tokens
        assert family.check_encoded(enc, config, planned=enc.num_tokens) == []
        return enc

    rate = proc.sampling_rate
    if limit is None:
        assert encoded(clip(301 * rate), proc).num_tokens > encoded(clip(300 * rate), proc).num_tokens
    else:
        s = clip(limit + 1)
        with pytest.raises(DataError) as err:
            family.count_tokens(s, proc)
        assert err.value.kind == "long_audio" and (err.value.file, err.value.line) == (s.source, s.line)
        with pytest.raises(DataError):
            family.encode(s, proc)
        truncated = encoded(s, dataclasses.replace(proc, long_audio="truncate"))
        assert truncated.num_tokens == encoded(clip(limit), proc).num_tokens
        assert encoded(s, dataclasses.replace(proc, long_audio="split")).num_tokens > truncated.num_tokens

    if "video" in family.media_keys:
        with_sound = encoded(sample(media_dir, MIXES["video_sound"]), proc)
        assert (family.media_keys["audio"] in with_sound.media) == family.audio_in_video
    recipe = recipe_for(family.name, "model.use_audio_in_video=true")
    if family.audio_in_video:
        assert processor_of(recipe, family, loaded.base_path).use_audio_in_video is True
    else:
        with pytest.raises(ConfigError, match="use_audio_in_video"):
            processor_of(recipe, family, loaded.base_path)
