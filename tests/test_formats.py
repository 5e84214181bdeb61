"""Formats people bring: LLaMA-Factory's v1 files (`image_url`/`audio_url`/`video_url` parts with
`value`, per-turn `loss_weight`), datasets named through LLaMA-Factory's `dataset_info.json`,
preference files recognised as such (one message per file), suggestions that never go in a
circle, and the dataset-folder check for every converted source as for our JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from finetune.data.check import check_dataset
from finetune.data.convert import FORMATS, convert_file, detect_format, main
from finetune.data.schema import DataError, load_samples, parse_sample
from finetune.models import processor_of

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int = 0, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def _wav(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path


def _mp4(path: Path, frames: int = 4) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as box:
        stream = box.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path


def _jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def _recipe(*overrides: str):
    from finetune.recipe import load_recipe

    return load_recipe("medical-tiny", ["data.demo=", "model.max_pixels=12544", *overrides])


def _text(value: str) -> dict:
    return {"type": "text", "value": value}


@pytest.fixture
def omni(tmp_path: Path) -> Path:
    """A dataset folder with an image, a speech clip and a video file."""
    _png(tmp_path / "media" / "scan.png", 90)
    _png(tmp_path / "media" / "prior.png", 30)
    _wav(tmp_path / "media" / "note.wav")
    _mp4(tmp_path / "media" / "echo.mp4")
    return tmp_path


def v1_records() -> list[dict]:
    """LLaMA-Factory v1 records, as its data/v1_*_demo.jsonl files write them."""
    return [
        {"messages": [
            {"role": "system", "content": [_text("You are a radiology assistant.")], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "image_url", "value": "media/scan.png"},
                                         {"type": "audio_url", "value": "media/note.wav"},
                                         _text("What does the note say about this scan?")], "loss_weight": 0.0},
            {"role": "assistant", "content": [_text("A nodule in the right upper lobe.")], "loss_weight": 1.0}]},
        {"messages": [
            {"role": "user", "content": [{"type": "video_url", "value": "media/echo.mp4"}, _text("Describe.")]},
            {"role": "assistant", "content": [_text("A beating heart.")]}]},
        # a multi-turn conversation whose first answer is context only, and whose last is never learned
        {"messages": [
            {"role": "user", "content": [{"type": "image_url", "value": "media/prior.png"}, _text("Prior?")],
             "loss_weight": 0.0},
            {"role": "assistant", "content": [_text("Clear.")], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "image_url", "value": "media/scan.png"}, _text("Now?")],
             "loss_weight": 0.0},
            {"role": "assistant", "content": [_text("A new nodule.")], "loss_weight": 1.0},
            {"role": "user", "content": [_text("Thanks.")], "loss_weight": 0.0},
            {"role": "assistant", "content": [_text("You are welcome.")], "loss_weight": 0.0}]},
    ]


# --------------------------------------------------------------------------- LLaMA-Factory v1


def test_llamafactory_v1_file_with_image_audio_and_video_converts_and_checks_clean(omni: Path, capsys):
    src = _jsonl(omni / "v1_omni.jsonl", v1_records())
    assert detect_format(src) == "llamafactory"

    # read directly, as `data check` reads any file
    report = check_dataset([src])
    assert report.errors == [] and report.n_ok == 3, report.format()

    # through `data convert`, auto-detected and with --from llamafactory
    for extra in ([], ["--from", "llamafactory"]):
        out = omni / f"ours{len(extra)}.jsonl"
        assert main(["convert", str(src), str(out), *extra]) == 0, capsys.readouterr().err
        report = check_dataset([out])
        assert report.errors == [] and report.n_ok == 3, report.format()
        first, second, third = (json.loads(x) for x in out.read_text().splitlines())
        assert first["messages"][1]["content"] == [
            {"type": "image", "path": "media/scan.png"}, {"type": "audio", "path": "media/note.wav"},
            {"type": "text", "text": "What does the note say about this scan?"}]
        assert first["messages"][2] == {"role": "assistant", "content": "A nodule in the right upper lobe."}
        assert second["messages"][0]["content"][0] == {"type": "video", "path": "media/echo.mp4"}
        # loss_weight 0 on an answer before a learned one: kept as context, not learned; the
        # unlearned answer after the last learned one adds nothing and is dropped (as LLaMA-Factory
        # trains only up to its last supervised turn)
        assert [m["role"] for m in third["messages"]] == ["user", "assistant", "user", "assistant"]
        assert third["messages"][1] == {"role": "assistant", "content": "Clear.", "loss": False}
        assert "loss" not in third["messages"][3]
    samples, _ = load_samples(out)
    assert [m.loss for m in samples[2].messages] == [True, False, True, True]


def test_llamafactory_v1_read_directly_as_data_train(omni: Path):
    from finetune.data.reading import read_split

    src = _jsonl(omni / "v1_omni.jsonl", v1_records())
    recipe = _recipe(f"data.train={src}")
    samples, errors = read_split(recipe.data.train, recipe)
    assert errors == [] and len(samples) == 3
    assert [p.type for p in samples[0].media()] == ["image", "audio"]
    assert samples[1].media()[0].path == (omni / "media" / "echo.mp4").resolve()
    assert [m.loss for m in samples[2].messages] == [True, False, True, True]
    assert samples[0].where == f"{src}:1"


@pytest.mark.slow
def test_data_check_with_a_recipe_encodes_a_v1_file(omni: Path):
    """`data check --recipe` reads the v1 file and encodes every sample as training does."""
    src = _jsonl(omni / "v1_omni.jsonl", v1_records())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", "data", "check", "--recipe", "medical-tiny", str(src),
                          "model.max_pixels=12544"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "3 samples, 3 ok, 0 errors" in res.stdout


def test_llamafactory_v1_loss_weights_and_parts(omni: Path):
    def one(messages, **extra):
        return {"messages": messages, **extra}

    user = {"role": "user", "content": [_text("Q")]}
    records = [
        one([user, {"role": "assistant", "content": [_text("A")], "loss_weight": 0.0}]),  # nothing to learn
        one([user, {"role": "assistant", "content": [_text("A")], "loss_weight": 0.5}]),  # a weight we lack
        one([user, {"role": "assistant", "content": [{"type": "reasoning", "value": "hm"}, _text("A")]}]),
        one([user, {"role": "assistant", "content": [{"type": "tool_call", "value": "{}"}]}]),
        one([{"role": "user", "content": [{"type": "image_url", "value": "https://x.org/a.png"}]},
             {"role": "assistant", "content": [_text("A")]}]),
        one([{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": [_text("A")]}]),
        one([user, {"role": "assistant", "content": [_text("A")], "loss_weight": "yes"}]),
        one([{"role": "user", "content": [_text("two "), _text("parts")], "loss_weight": 0.0},
             {"role": "assistant", "content": [_text("Fine"), _text(".")], "loss_weight": 1}], id="ok"),
    ]
    src = _jsonl(omni / "v1_bad.jsonl", records)
    res = convert_file(src, "llamafactory", on_error="skip")
    assert [s["id"] for s in res.samples] == ["ok"]
    assert res.samples[0]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "two "},
                                                                       {"type": "text", "text": "parts"}]},
                                          {"role": "assistant", "content": "Fine."}]
    by_line = {e.line: e for e in res.errors}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7]
    assert by_line[1].kind == "no_loss" and "loss_weight" in str(by_line[1]) and "Fix:" in str(by_line[1])
    assert by_line[2].kind == "bad_loss_weight" and "0.5" in str(by_line[2]) and "0 or 1" in str(by_line[2])
    assert by_line[3].kind == "unsupported_part" and "reasoning" in str(by_line[3])
    assert by_line[4].kind == "unsupported_part" and "tool_call" in str(by_line[4])
    assert by_line[5].kind == "remote_url"
    assert by_line[6].field == "messages[0].content[0].value"
    assert by_line[7].kind == "bad_loss_weight"


def test_llamafactory_demo_paths_relative_to_the_folder_it_runs_from(tmp_path: Path):
    """LLaMA-Factory's own v1 demo (data/v1_multimodal_demo.jsonl) names its images
    data/mllm_demo_data/1.jpg: relative to the folder LLaMA-Factory runs from, one above the file.
    They are found inside the file's folder, which they are."""
    _png(tmp_path / "data" / "mllm_demo_data" / "1.png")
    src = _jsonl(tmp_path / "data" / "v1_multimodal_demo.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "value": "data/mllm_demo_data/1.png"}, _text("Who?")]},
        {"role": "assistant", "content": [_text("Kane.")]}]}])
    report = check_dataset([src])
    assert report.errors == [], report.format()
    (s,) = convert_file(src).samples
    assert s["messages"][0]["content"][0]["path"] == str((tmp_path / "data" / "mllm_demo_data" / "1.png").absolute())


# --------------------------------------------------------------------------- the per-turn loss flag


def test_schema_turn_loss_flag(tmp_path: Path):
    def sample(*messages):
        return {"messages": list(messages)}

    u = {"role": "user", "content": "Q"}
    a = {"role": "assistant", "content": "A"}
    s = parse_sample(sample(u, {**a, "loss": False}, u, a), source="f", line=1, base_dir=tmp_path)
    assert [m.loss for m in s.messages] == [True, False, True, True]
    for bad, field in [(sample({**u, "loss": False}, a), "messages[0].loss"),
                       (sample(u, {**a, "loss": 0}), "messages[1].loss"),
                       (sample(u, {**a, "loss": False}), "messages[1].loss")]:
        with pytest.raises(DataError) as e:
            parse_sample(bad, source="f", line=3, base_dir=tmp_path)
        assert e.value.field == field and e.value.kind == "bad_loss" and "Fix:" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["qwen2_5_omni", "baichuan_omni", "gemma3n", "qwen3_omni_moe"])
def test_labels_follow_the_turn_loss_flag_in_every_family(name: str, tmp_path: Path):
    from finetune.families import get_family
    from finetune.families.base import IGNORE_INDEX

    fam = get_family(name)
    recipe = _recipe(f"model.path=tiny:{name}")
    proc = processor_of(recipe, fam)
    _png(tmp_path / "a.png", 60)

    def enc(first_loss: bool, turns: int = 2):
        msgs = [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                             {"type": "text", "text": "Is there a lesion?"}]},
                {"role": "assistant", "content": "Yes, a small one at the apex.", **({} if first_loss else
                                                                                      {"loss": False})},
                {"role": "user", "content": "Is it larger than before?"},
                {"role": "assistant", "content": "No, it is stable."}][:2 * turns]
        s = parse_sample({"messages": msgs}, source="f", line=1, base_dir=tmp_path)
        return fam.encode(s, proc)

    learned, context = enc(True), enc(False)
    only_first = enc(True, turns=1)
    assert torch_equal(learned.input_ids, context.input_ids)
    n_first = only_first.num_label_tokens
    assert n_first > 0 and context.num_label_tokens == learned.num_label_tokens - n_first
    same = context.labels == learned.labels
    assert bool(((context.labels == IGNORE_INDEX) | same).all())  # only ignored, never changed
    # the ignored tokens are the first answer's: the second answer is learned as before
    last = int((learned.labels != IGNORE_INDEX).nonzero().max())
    assert bool(same[only_first.num_tokens:].all()) and bool(same[last]) and context.labels[last] != IGNORE_INDEX


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# --------------------------------------------------------------------------- dataset_info.json


def test_dataset_info_entries(tmp_path: Path, capsys):
    from finetune.data.reading import read_split

    data = tmp_path / "data"
    _png(data / "mllm_demo_data" / "1.png", 10)
    _png(data / "mllm_demo_data" / "2.png", 20)
    _wav(data / "mllm_demo_data" / "1.wav")
    # sharegpt with OpenAI-style tags, in a subfolder: media resolve against dataset_info.json's folder
    _json(data / "sub" / "mllm_demo.json", [
        {"messages": [{"role": "user", "content": "<image>Who are they?"},
                      {"role": "assistant", "content": "Players."}],
         "images": ["mllm_demo_data/1.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<audio>What?"},
                      {"role": "assistant", "content": "Applause."}],
         "audios": ["mllm_demo_data/1.wav"]}])
    # alpaca with renamed columns
    _jsonl(data / "vqa.jsonl", [
        {"question": "<image>Lesion?", "detail": "Answer yes or no.", "reply": "yes", "pics": ["mllm_demo_data/2.png"],
         "sys": "You are a radiologist."}])
    # sharegpt with its default tags (from/value, human/gpt) and renamed columns
    _json(data / "chat.json", [
        {"dialog": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello."}],
         "img": "mllm_demo_data/1.png"}])
    info = _json(data / "dataset_info.json", {
        "mllm_demo": {"file_name": "sub/mllm_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images", "audios": "audios"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
        "vqa": {"file_name": "vqa.jsonl",
                "columns": {"prompt": "question", "query": "detail", "response": "reply", "images": "pics",
                            "system": "sys"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "images": "img"}},
        "dpo": {"file_name": "chat.json", "formatting": "sharegpt", "ranking": True},
        "hub": {"hf_hub_url": "llamafactory/RLHF-V"},
        "escape": {"file_name": "../elsewhere.json", "formatting": "sharegpt"},
    })
    _json(tmp_path / "elsewhere.json", [{"conversations": [{"from": "human", "value": "Q"},
                                                           {"from": "gpt", "value": "A"}]}])

    for name, n in (("mllm_demo", 2), ("vqa", 1), ("chat", 1)):
        ref = f"{info}#{name}"
        report = check_dataset([Path(ref)])
        assert report.errors == [] and report.n_ok == n, (name, report.format())
        recipe = _recipe(f"data.train={ref}")
        samples, errors = read_split(recipe.data.train, recipe)
        assert errors == [] and len(samples) == n
    recipe = _recipe(f"data.train={info}#vqa")
    (s,), _ = read_split(recipe.data.train, recipe)
    assert s.messages[0].role == "system" and s.messages[0].text() == "You are a radiologist."
    assert s.messages[1].parts[0].path == (data / "mllm_demo_data" / "2.png").resolve()
    assert s.messages[1].text() == "Lesion?\nAnswer yes or no." and s.messages[2].text() == "yes"

    out = tmp_path / "out" / "mllm.jsonl"
    assert main(["convert", f"{info}#mllm_demo", str(out)]) == 0, capsys.readouterr().err
    assert check_dataset([out], allow_outside_paths=True).errors == []

    def one_error(ref: str) -> DataError:
        report = check_dataset([Path(ref)])
        assert len(report.errors) == 1, report.format()
        return report.errors[0]

    e = one_error(f"{info}#mllm_dem")
    assert e.kind == "dataset_info" and "did you mean 'mllm_demo'" in str(e) and "mllm_demo, vqa" in str(e)
    e = one_error(f"{info}#hub")
    assert e.kind == "dataset_info" and "hf_hub_url" in str(e) and "hub:" in str(e)
    # a ranking entry whose records have no chosen answer: each record says so (issue 29 reads ranking files)
    report = check_dataset([Path(f"{info}#dpo")])
    assert report.errors and all(e.kind == "missing_column" and "'chosen'" in str(e) and "ranking" in str(e)
                                 for e in report.errors), report.format()
    e = one_error(f"{info}")
    assert e.kind == "dataset_info" and "#mllm_demo" in str(e)
    # the entry's file is held inside the list's folder, as its media are
    e = one_error(f"{info}#escape")
    assert e.kind == "outside_path" and "elsewhere.json" in str(e) and "data.allow_outside_paths" in str(e)
    assert check_dataset([Path(f"{info}#escape")], allow_outside_paths=True).errors == []


# --------------------------------------------------------------------------- preference files


def preference_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each preference form, 40 records each, with the words its message must name."""
    _png(folder / "img" / "a.png")
    n = 40
    forms = {
        "llamafactory sharegpt": ([{
            "conversations": [{"from": "human", "value": "<image>Is there a lesion?"}],
            "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."},
            "images": ["img/a.png"]}] * n, "conversations"),
        "llamafactory alpaca": ([{"instruction": "Lesion?", "input": "", "chosen": "Yes.", "rejected": "No."}] * n,
                                "instruction"),
        "llamafactory v1": ([{
            "chosen_messages": [{"role": "user", "content": [_text("Q")], "loss_weight": 0.0},
                                {"role": "assistant", "content": [_text("Yes.")], "loss_weight": 1.0}],
            "rejected_messages": [{"role": "user", "content": [_text("Q")], "loss_weight": 0.0},
                                  {"role": "assistant", "content": [_text("No.")], "loss_weight": 1.0}]}] * n,
            "chosen_messages"),
        "ms-swift": ([{"messages": [{"role": "user", "content": "<image>Lesion?"},
                                    {"role": "assistant", "content": "Yes."}],
                       "rejected_response": "No.", "images": ["img/a.png"]}] * n, "rejected_response"),
        "ours (top level)": ([{"messages": [{"role": "user", "content": "Lesion?"}],
                               "chosen": "Yes.", "rejected": "No."}] * n, "chosen"),
        "ours (last turn)": ([{"messages": [{"role": "user", "content": "Lesion?"},
                                            {"role": "assistant", "chosen": "Yes.", "rejected": "No."}]}] * n,
                             "chosen"),
        # LLaMA-Factory's kto_en_demo.json (and ms-swift's KTO): SFT would learn the undesirable answers too
        "KTO (messages + label)": ([{"messages": [{"role": "user", "content": "Lesion?"},
                                                  {"role": "assistant", "content": "No."}], "label": False}] * n,
                                   "label"),
    }
    out = {}
    for k, (name, (records, word)) in enumerate(forms.items()):
        path = (_json if k % 2 else _jsonl)(folder / f"pref{k}.{'json' if k % 2 else 'jsonl'}", records)
        out[name] = (path, word)
    return out


def test_preference_files_are_read_as_pairs_and_sft_says_dpo_once(tmp_path: Path, capsys):
    """Every pair form is read as our preference pairs (data check clean, convert, read as training
    reads it); SFT on them stops once with what to set (issue 29: it was ~300 unrelated errors);
    KTO feedback, which is not pairs, is still one error for the file."""
    from finetune.data.reading import check_method, read_split
    from finetune.errors import ConfigError

    for name, (path, word) in preference_files(tmp_path).items():
        report = check_dataset([path])
        if name.startswith("KTO"):
            assert len(report.errors) == 1, (name, report.format())
            (e,) = report.errors
            assert e.kind == "preference_data" and str(path) in str(e) and word in str(e), (name, str(e))
            with pytest.raises(DataError) as raised:
                convert_file(path, on_error="skip")
            assert raised.value.kind == "preference_data"
            assert main(["convert", str(path), str(tmp_path / "o.jsonl")]) == 1
            err = capsys.readouterr().err
            assert err.count("the file holds preference data") == 1 and len(err.strip().splitlines()) == 1, err
            continue
        assert report.errors == [] and report.n_ok == 40, (name, report.format())
        converted = convert_file(path, on_error="raise")
        last = converted.samples[0]["messages"][-1]
        assert (last["chosen"], last["rejected"]) in (("Yes.", "No."), ([{"type": "text", "text": "Yes."}],
                                                                         [{"type": "text", "text": "No."}])), (name, last)
        out = tmp_path / "o.jsonl"
        assert main(["convert", str(path), str(out)]) == 0, capsys.readouterr().err
        assert check_dataset([out], allow_outside_paths=True).errors == []

        recipe = _recipe(f"data.train={path}")
        samples, errors = read_split(recipe.data.train, recipe)
        assert errors == [] and len(samples) == 40 and all(s.is_preference for s in samples), name
        assert samples[0].rejected_sample().messages[-1].text() == "No."
        with pytest.raises(ConfigError) as raised:
            check_method(samples, "sft", str(path))
        msg = str(raised.value)
        assert msg.count("preference data") == 1 and "set train.method: dpo" in msg, msg
        check_method(samples, "dpo", str(path))  # what dpo takes


def test_an_omni_preference_file_in_each_form_reads_as_pairs_with_both_media(tmp_path: Path):
    """Issue 29: a preference file with an image and an audio in the prompt, in each form read
    (LLaMA-Factory sharegpt, alpaca and v1, ms-swift, ours at the top level and on the last turn):
    data check is clean, it converts to our pairs with both media before the question, and
    training's reader gives pairs whose two conversations both carry them."""
    from finetune.data.reading import check_method, read_split

    _png(tmp_path / "img" / "a.png")
    _wav(tmp_path / "audio" / "a.wav")
    q = "Is there a lesion?"
    v1 = lambda a: [  # noqa: E731
        {"role": "user", "content": [{"type": "image_url", "value": "img/a.png"},
                                     {"type": "audio_url", "value": "audio/a.wav"}, _text(q)], "loss_weight": 0.0},
        {"role": "assistant", "content": [_text(a)], "loss_weight": 1.0}]
    ours_prompt = [{"role": "user", "content": [{"type": "image", "path": "img/a.png"},
                                                {"type": "audio", "path": "audio/a.wav"}, {"type": "text", "text": q}]}]
    media = {"images": ["img/a.png"], "audios": ["audio/a.wav"]}
    forms = {
        "llamafactory sharegpt": {"conversations": [{"from": "human", "value": f"<image><audio>{q}"}],
                                  "chosen": {"from": "gpt", "value": "Yes."},
                                  "rejected": {"from": "gpt", "value": "No."}, **media},
        "llamafactory alpaca": {"instruction": f"<image><audio>{q}", "input": "", "chosen": "Yes.", "rejected": "No.",
                                **media},
        "llamafactory v1": {"chosen_messages": v1("Yes."), "rejected_messages": v1("No.")},
        "ms-swift": {"messages": [{"role": "user", "content": f"<image><audio>{q}"},
                                  {"role": "assistant", "content": "Yes."}], "rejected_response": "No.", **media},
        "ours (top level)": {"messages": ours_prompt, "chosen": "Yes.", "rejected": "No."},
        "ours (last turn)": {"messages": [*ours_prompt, {"role": "assistant", "chosen": "Yes.", "rejected": "No."}]},
    }
    for k, (name, record) in enumerate(forms.items()):
        path = _jsonl(tmp_path / f"omni{k}.jsonl", [record] * 3)
        report = check_dataset([path])
        assert report.errors == [] and report.n_ok == 3, (name, report.format())
        assert report.modality_counts == {"image+audio": 3}, (name, report.modality_counts)
        got = convert_file(path, on_error="raise").samples[0]["messages"]
        assert [m["role"] for m in got][-2:] == ["user", "assistant"], (name, got)
        assert [p["type"] for p in got[-2]["content"]][:2] == ["image", "audio"], (name, got)
        text = lambda a: a if isinstance(a, str) else "".join(p.get("text", "") for p in a)  # noqa: E731
        assert (text(got[-1]["chosen"]), text(got[-1]["rejected"])) == ("Yes.", "No."), (name, got[-1])
        recipe = _recipe(f"data.train={path}")
        samples, errors = read_split(recipe.data.train, recipe)
        assert errors == [] and len(samples) == 3, name
        check_method(samples, "dpo", name)
        for conv in (samples[0].chosen_sample(), samples[0].rejected_sample()):
            assert sorted(p.type for p in conv.media()) == ["audio", "image"], name
            assert conv.media()[0].path.is_file() and conv.media()[1].path.is_file(), name


def test_a_json_list_of_our_samples_is_read_as_records(tmp_path: Path):
    """A pretty-printed JSON list in our format (as LLaMA-Factory's demo files are written) is read
    record by record, not line by line."""
    from finetune.data.reading import read_split

    _png(tmp_path / "img" / "a.png")
    src = _json(tmp_path / "ours.json", [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/a.png"},
                                                   {"type": "text", "text": "Lesion?"}]},
                      {"role": "assistant", "content": "No."}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    report = check_dataset([src])
    assert report.errors == [] and report.n_ok == 2, report.format()
    recipe = _recipe(f"data.train={src}")
    samples, errors = read_split(recipe.data.train, recipe)
    assert errors == [] and [len(s.media()) for s in samples] == [1, 0]
    bad = _json(tmp_path / "outside.json", [{"messages": [
        {"role": "user", "content": [{"type": "image", "path": "../outside.png"}]},
        {"role": "assistant", "content": "A"}]}])
    assert [e.kind for e in check_dataset([bad]).errors] == ["outside_path"]


# --------------------------------------------------------------------------- suggestions


def one_record_per_format(folder: Path) -> dict[str, tuple[str, dict]]:
    """A record only its own format reads (media in it), and the `--from` that reads it."""
    _png(folder / "img" / "a.png")
    return {
        "ours": ("ours", {"messages": [
            {"role": "user", "content": [{"type": "image", "path": "img/a.png"}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"}]}),
        "llamafactory sharegpt": ("llamafactory", {
            "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
            "images": ["img/a.png"]}),
        "llamafactory v1": ("llamafactory", {"messages": [
            {"role": "user", "content": [{"type": "image_url", "value": "img/a.png"}, _text("Q")]},
            {"role": "assistant", "content": [_text("A")]}]}),
        "ms-swift": ("swift", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                               "images": ["img/a.png"]}),
        "openai": ("openai", {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/a.png"}},
                                         {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"}]}),
    }


def test_suggestions_never_go_in_a_circle(tmp_path: Path):
    """Each converter fed each other format either converts it to the same sample or names the
    `--from` that reads it; every `--from` a message names converts the record."""
    import re

    cases = one_record_per_format(tmp_path)
    for name, (right, record) in cases.items():
        src = _jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", [record])
        (want,) = convert_file(src, right).samples
        assert detect_format(src) == right, name
        for fmt in FORMATS:
            try:
                got = convert_file(src, fmt).samples
            except DataError as e:
                named = set(re.findall(r"--from (\w+)", str(e)))
                assert right in named, (name, fmt, str(e))
                assert fmt not in named, (name, fmt, str(e))
                for other in named:
                    assert convert_file(src, other).samples == [want], (name, fmt, other, str(e))
                continue
            assert got == [want], (name, fmt, got)  # read as well as by its own converter, or refused


# --------------------------------------------------------------------------- the dataset-folder check


def test_converted_sources_get_the_folder_check(tmp_path: Path):
    from finetune.data.reading import read_split

    outside = _png(tmp_path / "private" / "secret.png")
    folder = tmp_path / "data"
    _png(folder / "img" / "a.png")
    (folder / "img" / "link.png").symlink_to(outside)
    escapes = {"a parent path": "../private/secret.png", "an absolute path": str(outside),
               "a symlink": "img/link.png"}
    for how, ref in escapes.items():
        records = {
            "ours": {"messages": [{"role": "user", "content": [{"type": "image", "path": ref}]},
                                  {"role": "assistant", "content": "A"}]},
            "llamafactory": {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
                             "images": [ref]},
            "llamafactory v1": {"messages": [{"role": "user", "content": [{"type": "image_url", "value": ref}]},
                                             {"role": "assistant", "content": [_text("A")]}]},
            "swift": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                      "images": [ref]},
            "openai": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]},
                                    {"role": "assistant", "content": "A"}]},
        }
        for fmt, record in records.items():
            src = _jsonl(folder / f"{fmt.replace(' ', '_')}.jsonl", [record])
            report = check_dataset([src])
            assert [e.kind for e in report.errors] == ["outside_path"], (how, fmt, report.format())
            msg = str(report.errors[0])
            assert f"{src}:1" in msg and "outside the dataset folder" in msg, (how, fmt, msg)
            assert "data.allow_outside_paths" in msg, (how, fmt, msg)
            assert check_dataset([src], allow_outside_paths=True).errors == [], (how, fmt)

            recipe = _recipe(f"data.train={src}")
            with pytest.raises(DataError) as e:
                read_split(recipe.data.train, recipe)
            assert e.value.kind == "outside_path", (how, fmt, str(e.value))
            recipe = _recipe(f"data.train={src}", "data.allow_outside_paths=true")
            samples, _ = read_split(recipe.data.train, recipe)
            assert samples[0].media()[0].path == outside.resolve(), (how, fmt)
