"""Opt-in: our Baichuan-Omni-1.5 against the released reference code (random, shrunk weights).

Runs when FINETUNE_BAICHUAN_REF names the reference model code folder (baichuan-omni/model of
baichuan-inc/Baichuan-Omni-1.5). tests/baichuan_ref/ builds the reference model in its own venv
(transformers 4.45, our pure-PyTorch stand-ins for flash_attn and deepspeed), saves its weights,
inputs and logits; here they are loaded into our implementation and compared. See
tests/baichuan_ref/README.md. FINETUNE_BAICHUAN_TOKENIZER (a Qwen2 tokenizer folder with
merges.txt) enables the processor token-id comparison. The build also exports the golden numbers,
which are compared here with the ones committed in tests/data/baichuan_golden (that
tests/test_baichuan_golden.py checks on every run without the reference).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REF = os.environ.get("FINETUNE_BAICHUAN_REF")
HERE = Path(__file__).resolve().parent / "baichuan_ref"
pytestmark = pytest.mark.skipif(not REF, reason="set FINETUNE_BAICHUAN_REF to the reference model code folder "
                                                "(see tests/baichuan_ref/README.md)")
SPEECH = ("audio_head.", "audio_tokenizer.audio_decoder.", "audio_tokenizer.audio_flow_matching_decoder.")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = Path(os.environ.get("FINETUNE_BAICHUAN_REF_OUT") or tmp_path_factory.mktemp("baichuan_ref"))
    if not (out / "cases.pt").exists():
        venv = os.environ.get("FINETUNE_BAICHUAN_VENV",
                              str(Path.home() / ".cache" / "omni-finetune" / "baichuan-ref-venv"))
        env = dict(os.environ, FINETUNE_BAICHUAN_VENV=venv)
        subprocess.run(["bash", str(HERE / "setup_venv.sh")], check=True, env=env)
        subprocess.run([f"{venv}/bin/python", str(HERE / "build_reference.py"), "--out", str(out), "--seed", "0",
                        "--golden", str(out / "golden")], check=True, env=env)
    return out, torch.load(out / "cases.pt", weights_only=False)["cases"]


@pytest.fixture(scope="module")
def ours(reference):
    from finetune.families.baichuan_model import BaichuanOmniForCausalLM

    out, _ = reference
    model, info = BaichuanOmniForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True,
                                                           attn_implementation="sdpa")
    return model.eval(), info


def our_inputs(fi: dict, with_codes=None) -> dict:
    kw = {"input_ids": fi["input_ids"], "attention_mask": fi.get("attention_mask")}
    if fi.get("images"):
        kw["pixel_values"] = torch.cat(fi["images"])
        kw["image_grid_thw"] = torch.tensor([list(g) for g in fi["images_grid"]])
    if fi.get("videos"):
        kw["pixel_values_videos"] = torch.cat(fi["videos"])
        kw["video_grid_thw"] = torch.tensor([list(g) for g in fi["videos_grid"]])
    if fi.get("audios") is not None:
        mel = fi["audios"]
        if with_codes is not None:
            kw["audio_codes"] = with_codes
        else:
            assert mel.shape[0] == 1, "cases hold single-segment clips (valid frames = T)"
            kw["audio_features"] = [mel[0]]
    return kw


def test_checkpoint_loads_with_zero_missing_and_unexpected_keys_for_the_trained_parts(ours, reference):
    from finetune.checkpoint import tensors_of

    model, info = ours
    out, _ = reference
    assert not info["missing_keys"], sorted(info["missing_keys"])[:5]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(SPEECH)]
    assert not unexpected, unexpected[:5]
    on_disk = {k for k in tensors_of(out) if not k.startswith(SPEECH)}
    assert on_disk == set(model.state_dict())


@pytest.mark.parametrize("case", ["text", "image", "video", "audio", "image+audio"])
def test_logits_match_the_reference(ours, reference, case):
    model, _ = ours
    _, cases = reference
    c = cases[case]
    fi = c["forward_inputs"]
    with torch.no_grad():
        got = model(**our_inputs(fi)).logits
        diff = float((got - c["logits"]).abs().max())
        print(f"{case}: max |logit diff| end to end {diff:.3e}")
        if "audio_codes" in c:
            codes = model.audio_tokenizer.encode([fi["audios"][0]])
            same = float((codes == c["audio_codes"]).float().mean())
            print(f"{case}: audio codes equal to the reference's: {same:.4f}")
            given = model(**our_inputs(fi, with_codes=c["audio_codes"])).logits
            diff_given = float((given - c["logits"]).abs().max())
            print(f"{case}: max |logit diff| given the reference's codes {diff_given:.3e}")
            assert diff_given <= 1e-4
            assert same == 1.0 or diff <= 1e-4
    assert diff <= 1e-4 or ("audio_codes" in c and same < 1.0)


def test_packed_row_matches_the_reference_varlen_path(ours, reference):
    model, _ = ours
    _, cases = reference
    c = cases["packed:text|image"]
    fi = c["forward_inputs"]
    n_text = int(fi["seqlens"][0, 0])
    L = fi["input_ids"].shape[1]
    pos = torch.cat([torch.arange(n_text), torch.arange(L - n_text)])[None]  # ours restart per sample
    kw = our_inputs({k: v for k, v in fi.items() if k != "seqlens"})
    kw.pop("attention_mask", None)
    with torch.no_grad():
        got = model(**kw, position_ids=pos, use_cache=False).logits
    diff = float((got - c["logits"]).abs().max())
    print(f"packed text|image: max |logit diff| {diff:.3e}")
    assert diff <= 1e-4


def test_processor_token_ids_match_the_reference(reference, tmp_path):
    from finetune.data.schema import parse_sample
    from finetune.families.baichuan_omni import BaichuanOmniFamily, BaichuanProcessor

    tok_dir = os.environ.get("FINETUNE_BAICHUAN_TOKENIZER")
    out, _ = reference
    ref = json.loads((out / "token_ids.json").read_text())
    if not tok_dir or "merges.txt" not in ref.get("tokenizer", ""):
        pytest.skip("set FINETUNE_BAICHUAN_TOKENIZER to a Qwen2 tokenizer folder (merges.txt) for this check")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(out / "config.json", folder / "config.json")
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "vocab.json"):
        if (Path(REF) / name).exists():
            shutil.copy(Path(REF) / name, folder / name)
    shutil.copy(Path(tok_dir) / "merges.txt", folder / "merges.txt")
    proc = BaichuanProcessor.from_folder(folder)
    sample = parse_sample({"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "path": ref["media"]["image"]},
                                     {"type": "audio", "path": ref["media"]["audio"]},
                                     {"type": "text", "text": "Answer the spoken question about the image."}]},
        {"role": "assistant", "content": "It is noise."}]}, source="t.jsonl", line=1, base_dir=out)
    ids = BaichuanOmniFamily().encode(sample, proc).input_ids.tolist()
    print(f"token ids: ours {len(ids)}, reference {len(ref['input_ids'])}, equal {ids == ref['input_ids']}")
    assert ids == ref["input_ids"]


def test_the_committed_golden_numbers_are_what_the_reference_gives(reference):
    """tests/data/baichuan_golden equals a fresh export from the reference (tests/test_baichuan_golden.py
    compares ours with it on every run)."""
    from safetensors.torch import load_file

    out, _ = reference
    fresh, committed = out / "golden", HERE.parent / "data" / "baichuan_golden"
    if not (fresh / "golden.json").exists():
        pytest.skip(f"{out} was built without --golden")
    a = json.loads((fresh / "golden.json").read_text(encoding="utf-8"))
    b = json.loads((committed / "golden.json").read_text(encoding="utf-8"))
    for key in ("format", "seed", "reference_sha256", "weights", "media", "logits", "cases"):
        assert a[key] == b[key], key
    assert json.loads((fresh / "weights.json").read_text()) == json.loads((committed / "weights.json").read_text())
    if a["token_ids"]["tokenizer"].split(" from ")[0] == b["token_ids"]["tokenizer"].split(" from ")[0]:
        assert a["token_ids"]["samples"] == b["token_ids"]["samples"]
    ta, tb = load_file(str(fresh / "golden.safetensors")), load_file(str(committed / "golden.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        if ta[k].is_floating_point():
            # another CPU may round the reference's float32 kernels differently in the last bits
            assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-5), (k, float((ta[k] - tb[k]).abs().max()))
        else:
            assert torch.equal(ta[k], tb[k]), k
