"""Export: merged checkpoints in the base's layout, verified, atomic, reproducible; adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_recipe
from finetune.models import load_spec

pytestmark = pytest.mark.slow


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_demo):
    """`python -m finetune run medical-tiny` (train, eval, export) on the small demo data."""
    out = tmp_path_factory.mktemp("cli") / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "finetune", "run", "medical-tiny",
            f"data.train={small_demo['train']}", f"data.eval={small_demo['eval']}", "data.demo=",
            f"output.dir={out}", "model.max_pixels=12544", "train.max_steps=8", "train.lr=5e-3",
            "data.max_tokens=256", "eval.max_samples=8", "eval.max_new_tokens=8"]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def export_cli(run, *extra, kill=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if kill:
        env["FINETUNE_EXPORT_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "finetune", "export", str(run), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def probe_diff(model_a, model_b, fam, loaded, samples):
    from finetune.probes import pick_probes

    rope = fam.rope_index(loaded.model)
    worst = 0.0
    for s in pick_probes(samples):
        b = fam.collate_padded([fam.encode(s, loaded.processor, rope=rope)], loaded.processor.pad_id)
        b.pop("labels")
        with torch.no_grad():
            worst = max(worst, float((model_a(**b).logits - model_b(**b).logits).abs().max()))
    return worst


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_merged_export_reproduces_the_adapter_model(tmp_path, small_demo, quantize):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from finetune.export import export_run
    from finetune.families import get_family
    from finetune.data.reading import read_split
    from finetune.train import train

    recipe = tiny_recipe(tmp_path, small_demo, f"model.quantize={quantize}", "train.max_steps=3",
                         "train.lr=5e-3", "export.max_shard_size=200KB")
    run = train(recipe)
    out = export_run(run)["merged"]
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["max_abs_diff"] <= 1e-4
    assert manifest["dtype"] == "float32"  # QLoRA too: the export is not quantised
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "chat_template.json", "generation_config.json", "README.md", "recipe.yaml",
                 "model.safetensors.index.json"):
        assert (out / name).exists(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)  # 200KB shards: really sharded
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 12544  # training's
    assert manifest["files"].keys() == {p.name for p in out.iterdir() if p.name != "export_manifest.json"}
    # the card says how to serve it: the toolkit's commands, and vLLM's tested command, whose thinker-only
    # layout needs the full one first
    card = (out / "README.md").read_text()
    serve = card[card.index("## Serve it"):]
    assert "python -m finetune chat path/to/merged" in serve and "python -m finetune serve path/to/merged" in serve
    assert "vllm serve path/to/merged" in serve and "thinker-only layout" in serve and "wrap_full" in serve

    # independent check: plain transformers loads the export; logits match base+adapter (fp32)
    fam = get_family("qwen2_5_omni")
    loaded = fam.load(load_spec(recipe, quantize="none", dtype=torch.float32, attn="sdpa"))
    ref_model = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).eval()
    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    samples, _ = read_split(recipe.data.eval, recipe)
    assert probe_diff(ref_model, merged, fam, loaded, samples) <= 1e-4
    # the adapter moved the model: the export is not simply the base
    base = fam.load(load_spec(recipe, quantize="none", dtype=torch.float32, attn="sdpa")).model
    assert any(not torch.equal(p, merged.state_dict()[n]) for n, p in base.state_dict().items()
               if n in merged.state_dict())


def test_full_omni_base_exports_a_full_checkpoint(tmp_path, small_demo):
    from peft import PeftModel
    from transformers import Qwen2_5OmniForConditionalGeneration

    from finetune.checkpoint import raw_equal, tensors_of
    from finetune.export import export_run
    from finetune.families import get_family
    from finetune.data.reading import read_split
    from finetune.train import train

    recipe = tiny_recipe(tmp_path, small_demo, "model.path=tiny:qwen2_5_omni-full", "train.max_steps=3",
                         "train.lr=5e-3", "roles.vision_projector.mode=full")
    run = train(recipe)
    out = export_run(run)["merged"]
    fam = get_family("qwen2_5_omni")
    base_dir = fam.resolve_path("tiny:qwen2_5_omni-full")
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["max_abs_diff"] <= 1e-4
    assert manifest["unchanged_from_base"]["parts"] == ["talker", "token2wav"]
    card = (out / "README.md").read_text()  # the full layout serves in vLLM as exported
    assert "vllm serve path/to/merged" in card and "thinker-only layout" not in card

    # same tensor names as the base; talker and token2wav bit-identical; thinker changed
    base_t, out_t = tensors_of(base_dir), tensors_of(out)
    assert base_t.keys() == out_t.keys()
    speech = [k for k in base_t if k.startswith(("talker.", "token2wav."))]
    assert speech and all(raw_equal(base_t[k], out_t[k]) for k in speech)
    assert any(not raw_equal(base_t[k], out_t[k]) for k in base_t if k.startswith("thinker."))
    assert (out / "spk_dict.pt").read_bytes() == (base_dir / "spk_dict.pt").read_bytes()

    # loads as the full omni model, whose thinker matches the adapter model
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    assert full.has_talker and full.speaker_map
    loaded = fam.load(load_spec(recipe, quantize="none", dtype=torch.float32, attn="sdpa"))
    assert loaded.is_full_checkpoint
    ref_model = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).eval()
    samples, _ = read_split(recipe.data.eval, recipe)
    assert probe_diff(ref_model, full.thinker, fam, loaded, samples) <= 1e-4
    base_full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    for part in ("talker", "token2wav"):
        a, b = getattr(base_full, part).state_dict(), getattr(full, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_existing_target_and_is_byte_identical(cli_run):
    from finetune.export import ExportError, export_run

    out = cli_run / "merged"
    first = files_of(out)
    with pytest.raises(ExportError, match="--force"):
        export_run(cli_run)
    export_run(cli_run, force=True)
    assert files_of(out) == first
    assert not [p for p in cli_run.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


def test_an_export_killed_midway_leaves_no_partial_target(tmp_path, cli_run):
    import shutil

    from finetune.export import recover

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    previous = files_of(run / "merged")
    shutil.rmtree(run / "merged")

    # killed after the shards were written, before verification: no target at all
    res = export_cli(run, kill="merged_written")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not (run / "merged").exists()
    assert list(run.glob("merged.tmp-*"))  # it really died midway, leaving its temporary folder

    # the next export cleans up and completes
    res = export_cli(run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert files_of(run / "merged") == previous and not list(run.glob("merged.tmp-*"))

    # killed while replacing an existing export: the previous one is untouched
    for point in ("merged_written", "verified"):
        res = export_cli(run, "--force", kill=point)
        assert res.returncode == -signal.SIGKILL
        assert files_of(run / "merged") == previous

    # killed between moving the old export aside and moving the new one in: recovered next time
    res = export_cli(run, "--force", kill="swapping")
    assert res.returncode == -signal.SIGKILL
    assert not (run / "merged").exists() and (run / "merged.old").exists()
    recover(run / "merged")
    assert files_of(run / "merged") == previous and not (run / "merged.old").exists()


def test_adapter_export_loads_with_peft_beside_its_processor(cli_run):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from finetune.export import export_run
    from finetune.families import get_family
    from finetune.recipe import load_resolved
    from finetune.data.reading import read_split

    out = export_run(cli_run, fmt="adapter", force=True)["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "chat_template.json", "README.md"):
        assert (out / name).exists(), name
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 12544
    recipe = load_resolved(cli_run / "recipe.yaml")
    fam = get_family("qwen2_5_omni")
    base_dir = fam.resolve_path(recipe.model.path)
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(cli_run / "merged"),
                                                                        dtype=torch.float32).eval()
    loaded = fam.load(load_spec(recipe, quantize="none", dtype=torch.float32, attn="sdpa"))
    samples, _ = read_split(recipe.data.eval, recipe)
    assert probe_diff(peft_model, merged, fam, loaded, samples) <= 1e-4


def test_export_answers_the_same_in_a_fresh_process_with_transformers_alone(cli_run, small_demo):
    preds = cli_run / "fresh.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "generate_with_transformers.py"),
                          str(cli_run / "merged"), str(small_demo["eval"]), "--limit", "8", "--out", str(preds)],
                         cwd=cli_run, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = [json.loads(x) for x in (cli_run / "predictions.jsonl").read_text().splitlines()]
    fresh = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(fresh) == len(ours) == 8
    assert [f["prediction"] for f in fresh] == [o["tuned"] for o in ours]
    ev = json.loads((cli_run / "eval.json").read_text())
    acc = sum(f["match"] for f in fresh) / len(fresh)
    assert acc == ev["tuned"]["accuracy"]
    assert f"exact-match accuracy {acc:.3f}" in res.stdout


def test_quantized_export_is_written_beside_and_loads(cli_run):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from finetune.export import export_quantized
    from finetune.recipe import load_resolved

    recipe = load_resolved(cli_run / "recipe.yaml")
    recipe.export.quantize = "4bit"
    out = export_quantized(cli_run, recipe, force=True)
    assert out.name == "merged-4bit"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] and cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["loads"] and "NF4" in manifest["format"]
    assert 0 < manifest["max_abs_logit_diff_vs_merged"] < manifest["logit_scale"]
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out))
    assert any("4bit" in type(m.weight).__name__.lower() or "params4bit" in type(m.weight).__name__.lower()
               for m in model.modules() if hasattr(m, "weight") and m.weight is not None)
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


def example_answers(run, data, tmp_path, *extra):
    """(the run's merged export's answers by the transformers-only example, its stdout)."""
    from finetune.export import export_run

    merged = export_run(run, force=True)["merged"]
    preds = tmp_path / "fresh.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "generate_with_transformers.py"), str(merged),
                          str(data), *extra, "--out", str(preds)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(x) for x in preds.read_text().splitlines()], res.stdout


def eval_answers(run, data, keep=lambda s: True) -> list[str]:
    """Eval's greedy answers (the run's adapter) to the samples of `data` that `keep` keeps."""
    from finetune.data.reading import read_split
    from finetune.inference import open_model
    from finetune.probes import generate

    a = open_model(str(run), device="cpu")
    samples, _ = read_split(str(data), a.recipe)
    samples = [s for s in samples if keep(s)]
    return generate(a.model, a.family, a.processor, samples, a.rope, max_new_tokens=a.max_new_tokens, batch_size=1)


@pytest.mark.parametrize("family", ["qwen3_omni_moe", "gemma3n", "gemma4", "nemotron_omni"])
def test_the_transformers_example_answers_other_families_exports_as_eval_does(family, tiny_runs, small_demo, tmp_path):
    """The example answers each export transformers has a class for, as eval's greedy generation
    answers the same samples with the run's adapter."""
    run = tiny_runs(family)
    fresh, _ = example_answers(run, small_demo["eval"], tmp_path, "--limit", "3")
    ours = eval_answers(run, small_demo["eval"])[:3]
    assert len(fresh) == 3 and [f["prediction"] for f in fresh] == ours


VIDEO_SAMPLES = [  # media from media_samples.write_media: a.png, a.wav, vid/ (5 frames), av.mp4 (4 fps, 2.5 s)
    [{"type": "image", "path": "a.png"}, {"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}],
    [{"type": "video", "path": "vid"}, {"type": "text", "text": "Is there a lesion?"}],
    [{"type": "video", "path": "av.mp4"}, {"type": "text", "text": "Is there a lesion?"}],
    [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "a.wav"}, {"type": "video", "path": "vid", "fps": 4},
     {"type": "text", "text": "All of it."}],
]


@pytest.mark.parametrize("family", ["gemma4", "qwen2_5_omni", "qwen3_omni_moe", "nemotron_omni"])
def test_the_transformers_example_answers_video_as_eval_does(family, tiny_runs, media_dir, tmp_path):
    """Video from a file and from a folder of frames (thinned by its fps), alone and beside an image
    and audio: the example answers it as eval does where it reads the family's video (Gemma 4,
    Qwen2.5-Omni, Qwen3-Omni: for Qwen its inputs equal the toolkit's encoding exactly), and
    elsewhere skips those samples, says so with the reason, and answers the rest as eval does."""
    data = media_dir / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": f"v{i}", "messages": [
        {"role": "system", "content": "You are a radiology assistant."}, {"role": "user", "content": parts},
        {"role": "assistant", "content": "Yes. A lesion."}], "answer": "yes"}) + "\n"
        for i, parts in enumerate(VIDEO_SAMPLES)))
    run = tiny_runs(family)
    fresh, stdout = example_answers(run, data, tmp_path)
    if family != "nemotron_omni":
        assert [f["id"] for f in fresh] == ["v0", "v1", "v2", "v3"] and "skipped" not in stdout
        ours = eval_answers(run, data)
        if family != "gemma4":
            qwen_inputs_equal_the_toolkits(run, data)
    else:
        assert [f["id"] for f in fresh] == ["v0"]
        assert "1 samples answered (3 with video skipped: the toolkit answers no video for Nemotron" in stdout
        ours = eval_answers(run, data, keep=lambda s: not any(p.type == "video" for m in s.messages for p in m.parts))
    assert [f["prediction"] for f in fresh] == ours


def qwen_inputs_equal_the_toolkits(run, data):
    """The example's Qwen inputs for each sample of `data` (token ids, video pixels, grid, seconds
    per grid, image pixels and grid) are the toolkit's generation encoding of it, value for value."""
    import importlib.util
    from pathlib import Path

    from finetune.data.reading import read_split
    from finetune.inference import open_model

    spec = importlib.util.spec_from_file_location("example_gwt", ROOT / "examples" / "generate_with_transformers.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    merged = Path(run) / "merged"  # written by example_answers
    config = json.loads((Path(merged) / "config.json").read_text())
    proc = ex.QwenInputs(str(merged), config)
    fps = float(ex.recipe_setting(str(merged), "model", "video_fps", 2.0))
    max_frames = int(ex.recipe_setting(str(merged), "model", "video_max_frames", 16))
    system = ex.recipe_setting(str(merged), "data", "system_prompt")
    a = open_model(str(run), device="cpu")
    samples, _ = read_split(str(data), a.recipe)
    lines = [json.loads(x) for x in Path(data).read_text().splitlines()]
    assert len(samples) == len(lines) == 4
    for line, sample in zip(lines, samples):
        msgs, images, audios, videos = ex.conversation(line, Path(data).parent, system, proc.sampling_rate)
        got = proc(msgs, images, audios, [ex.read_video(v, Path(data).parent, fps, max_frames) for v in videos])
        enc = a.family.encode(sample, a.processor, for_generation=True)
        assert torch.equal(got["input_ids"][0], enc.input_ids), line["id"]
        for key in ("pixel_values_videos", "video_grid_thw", "video_second_per_grid", "pixel_values",
                    "image_grid_thw"):
            assert (key in got) == (key in enc.media), (line["id"], key)
            if key in got:
                same = got[key].dtype == enc.media[key].dtype and torch.equal(got[key], enc.media[key])
                assert same, (line["id"], key)
