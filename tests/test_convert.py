"""`data convert`: templates over tables, LLaMA-Factory / ms-swift / OpenAI inputs, and back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from finetune.data.check import check_dataset
from finetune.data.convert import (
    convert_file,
    convert_table,
    detect_format,
    llamafactory_from_ours,
    load_template,
    main,
    write_jsonl,
)
from finetune.data.schema import DataError, load_samples

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "data_templates" / "templates").glob("*.yaml"))
TABLES = ROOT / "data_templates" / "examples" / "tables"


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def _wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    return path


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """tmp_path with img/a.png, img/b.png, audio/n.wav and a 2-frame clip."""
    _png(tmp_path / "img" / "a.png", 10)
    _png(tmp_path / "img" / "b.png", 20)
    _wav(tmp_path / "audio" / "n.wav")
    _png(tmp_path / "clip" / "000.png", 30)
    _png(tmp_path / "clip" / "001.png", 40)
    return tmp_path


def _abs(root: Path, rel: str) -> str:
    return str((root / rel).absolute())


# --------------------------------------------------------------------------- templates


def _example_table(template: Path) -> Path:
    tables = [p for p in TABLES.glob(template.stem + ".*") if p.suffix in (".csv", ".tsv", ".jsonl", ".json")]
    assert len(tables) == 1, f"template {template.name} needs exactly one example table in {TABLES}"
    return tables[0]


def test_templates_are_shipped():
    names = {t.stem for t in TEMPLATES}
    assert {"closed_vqa_yes_no", "closed_vqa_multiple_choice", "open_vqa", "report_generation",
            "multi_image_comparison", "audio_qa", "consultation"} <= names
    total = sum(f.stat().st_size for f in TABLES.rglob("*") if f.is_file())
    assert total < 200_000


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_template_converts_its_example(template: Path, tmp_path: Path):
    folder = tmp_path / "tables"
    shutil.copytree(TABLES, folder)
    table = folder / _example_table(template).name
    result = convert_table(template, table)
    assert not result.errors and len(result.samples) == result.n_records > 0
    out = folder / f"{template.stem}.out.jsonl"
    assert write_jsonl(result.samples, out) == 0
    report = check_dataset([out])
    assert report.errors == [], report.format()
    assert report.n_ok == len(result.samples)
    # Paths were rewritten relative to the output file.
    for line in out.read_text().splitlines():
        for m in json.loads(line)["messages"]:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    if "path" in p:
                        assert p["path"].startswith("media/")


def test_template_details(tmp_path: Path):
    shutil.copytree(TABLES, tmp_path / "t")
    cons = convert_table(ROOT / "data_templates/templates/consultation.yaml", tmp_path / "t/consultation.csv")
    first, second = cons.samples
    assert [m["role"] for m in first["messages"]] == ["system"] + ["user", "assistant"] * 3
    assert [m["role"] for m in second["messages"]] == ["system"] + ["user", "assistant"] * 2  # optional turn
    assert first["answer"] == "CT chest" and "answer" not in second
    assert first["referrer"] == "emergency"  # keep:
    audio = convert_table(ROOT / "data_templates/templates/audio_qa.yaml", tmp_path / "t/audio_qa.csv")
    assert [p["type"] for p in audio.samples[0]["messages"][0]["content"]] == ["audio", "text"]
    assert [p["type"] for p in audio.samples[1]["messages"][0]["content"]] == ["audio", "image", "text"]
    cmp_ = convert_table(ROOT / "data_templates/templates/multi_image_comparison.yaml",
                         tmp_path / "t/multi_image_comparison.csv")
    parts = cmp_.samples[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0]["text"] == "Prior study (2023-03-01):"
    assert parts[1]["path"].endswith("prior_01.png") and parts[3]["path"].endswith("current_01.png")


def _template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_template_key_is_a_clear_error(tmp_path: Path):
    path = _template(tmp_path, 'user: "{question}"\nasistant: "{answer}"\n')
    with pytest.raises(DataError) as e:
        load_template(path)
    msg = str(e.value)
    assert e.value.kind == "template" and str(path) in msg
    assert "unknown key 'asistant'" in msg and "did you mean 'assistant'?" in msg

    path = _template(tmp_path, 'user:\n  - imag: "{image}"\nassistant: "{answer}"\n')
    with pytest.raises(DataError, match=r"user\[0\].*did you mean 'image'"):
        load_template(path)
    path = _template(tmp_path, 'user: "{question"\nassistant: "{answer}"\n')
    with pytest.raises(DataError, match=r"user\[0\]: bad placeholder.*\{\{"):
        load_template(path)
    path = _template(tmp_path, 'user: "{question}"\n')
    with pytest.raises(DataError, match="no 'assistant'"):
        load_template(path)
    path = _template(tmp_path, 'user: [x\n')
    with pytest.raises(DataError, match="invalid YAML"):
        load_template(path)


def test_template_column_and_value_errors(tmp_path: Path):
    _png(tmp_path / "a.png")
    table = tmp_path / "rows.csv"
    table.write_text("image,question,answer\na.png,Is it?,yes\na.png,,no\nmissing.png,Is it?,yes\n")
    tpl = _template(tmp_path, 'user: [{image: "{image}"}, "{question}"]\nassistant: "{answr}"\n')
    with pytest.raises(DataError, match=r"column 'answr'.*did you mean 'answer'\?"):
        convert_table(tpl, table)
    tpl = _template(tmp_path, 'user: [{image: "{image}"}, "{question}"]\nassistant: "{answer}"\n')
    with pytest.raises(DataError) as e:
        convert_table(tpl, table)
    assert e.value.kind == "empty_value" and e.value.line == 3 and "column 'question' is empty" in str(e.value)
    res = convert_table(tpl, table, on_error="skip")
    assert len(res.samples) == 1 and res.n_records == 3
    assert res.error_counts() == {"empty_value": 1, "missing_file": 1}
    assert res.errors[1].line == 4 and "missing.png" in str(res.errors[1])


def test_template_several_files_per_cell(media: Path):
    tpl = _template(media, 'user:\n  - image: "{images}"\n    sep: ";"\n    extra: {window: lung}\n'
                           '  - "{q}"\nassistant: "{a}"\n')
    csv_table = media / "rows.csv"
    csv_table.write_text("images,q,a\nimg/a.png; img/b.png,Compare?,same\n")
    jsonl_table = _write_jsonl(media / "rows.jsonl", [{"images": ["img/a.png", "img/b.png"], "q": "Compare?",
                                                       "a": "same"}])
    for table in (csv_table, jsonl_table):
        (s,) = convert_table(tpl, table).samples
        assert s["messages"][0]["content"] == [
            {"type": "image", "path": _abs(media, "img/a.png"), "window": "lung"},
            {"type": "image", "path": _abs(media, "img/b.png"), "window": "lung"},
            {"type": "text", "text": "Compare?"}]
        assert s["id"] == "rows-1"


# --------------------------------------------------------------------------- LLaMA-Factory


def test_llamafactory_messages(media: Path):
    src = _write_json(media / "mllm.json", [{
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Prior:<image>\nCurrent: <image>Is it larger?"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Any effusion?"},
            {"role": "assistant", "content": "no"}],
        "images": ["img/a.png", "img/b.png"], "id": "x1", "answer": "yes"}])
    (s,) = convert_file(src, "llamafactory").samples
    assert s["id"] == "x1" and s["answer"] == "yes"
    assert s["messages"][0] == {"role": "system", "content": "Be brief."}
    assert s["messages"][1]["content"] == [
        {"type": "text", "text": "Prior:"},
        {"type": "image", "path": _abs(media, "img/a.png")},
        {"type": "text", "text": "Current:"},
        {"type": "image", "path": _abs(media, "img/b.png")},
        {"type": "text", "text": "Is it larger?"}]
    assert s["messages"][3] == {"role": "user", "content": "Any effusion?"}
    assert [m["role"] for m in s["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_llamafactory_conversations(media: Path, tmp_path: Path):
    # Media under another folder: --media-root.
    src = _write_jsonl(tmp_path / "sub_data.jsonl", [{
        "conversations": [
            {"from": "human", "value": "<audio><image>What does the note say about this image?"},
            {"from": "gpt", "value": "A nodule."}],
        "system": "You are a radiology assistant.",
        "images": ["img/a.png"], "audios": ["audio/n.wav"]}, {
        "conversations": [{"from": "human", "value": "<video>Describe."}, {"from": "gpt", "value": "Motion."}],
        "videos": [["clip/000.png", "clip/001.png"]]}])
    res = convert_file(src, "llamafactory", media_root=media)
    a, b = res.samples
    assert a["messages"] == [
        {"role": "system", "content": "You are a radiology assistant."},
        {"role": "user", "content": [
            {"type": "audio", "path": _abs(media, "audio/n.wav")},
            {"type": "image", "path": _abs(media, "img/a.png")},
            {"type": "text", "text": "What does the note say about this image?"}]},
        {"role": "assistant", "content": "A nodule."}]
    assert b["messages"][0]["content"] == [
        {"type": "video", "frames": [_abs(media, "clip/000.png"), _abs(media, "clip/001.png")]},
        {"type": "text", "text": "Describe."}]


def test_llamafactory_placeholder_mismatch(media: Path):
    src = _write_json(media / "bad.json", [
        {"messages": [{"role": "user", "content": "<image>ok"}, {"role": "assistant", "content": "a"}],
         "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "b"}],
         "images": ["img/a.png"]}])
    with pytest.raises(DataError) as e:
        convert_file(src, "llamafactory")
    msg = str(e.value)
    assert e.value.kind == "placeholder_mismatch"
    assert str(src) in msg and "record[1].images" in msg
    assert "2 <image> placeholders" in msg and "1 entry in 'images'" in msg and "Fix:" in msg
    res = convert_file(src, "llamafactory", on_error="skip")
    assert len(res.samples) == 1 and res.error_counts() == {"placeholder_mismatch": 1}


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_check_names_the_source_record_of_a_converted_sample(media: Path, container: str):
    """A media error in a converted file points at its own record, not at its rank among the
    records that converted (record 2 fails conversion, record 3 has an unreadable image)."""
    (media / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    records = [
        {"messages": [{"role": "user", "content": "<image>ok"}, {"role": "assistant", "content": "a"}],
         "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "b"}],
         "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "<image>Broken?"}, {"role": "assistant", "content": "c"}],
         "images": ["img/broken.png"]}]
    src = (_write_jsonl if container == "jsonl" else _write_json)(media / f"lf.{container}", records)
    report = check_dataset([src])
    assert report.n_samples == 3 and report.n_ok == 1
    kinds = {e.kind: e for e in report.errors}
    assert set(kinds) == {"placeholder_mismatch", "unreadable_image"}
    bad = kinds["unreadable_image"]
    if container == "jsonl":
        assert bad.line == 3 and kinds["placeholder_mismatch"].line == 2
    else:
        assert bad.line == 0 and bad.field.startswith("record[2].")
        assert kinds["placeholder_mismatch"].field.startswith("record[1].")


def test_unknown_and_tool_roles(media: Path):
    src = _write_jsonl(media / "roles.jsonl", [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "doctor", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "observation", "value": "{}"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    with pytest.raises(DataError) as e:
        convert_file(src, "llamafactory")
    msg = str(e.value)
    assert e.value.kind == "unknown_role" and e.value.line == 1
    assert 'conversations[1].from: unknown role "doctor"' in msg and "--role" in msg
    res = convert_file(src, "llamafactory", on_error="skip")
    assert len(res.samples) == 1 and res.error_counts() == {"unknown_role": 1, "unsupported_role": 1}
    res = convert_file(src, "llamafactory", on_error="skip", role_map={"doctor": "assistant"})
    assert len(res.samples) == 2


def test_llamafactory_alpaca_and_media_in_assistant(media: Path):
    src = _write_json(media / "alpaca.json", [
        {"instruction": "<image>Describe", "input": "briefly", "output": "Fine.", "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<image>A"}],
         "images": ["img/a.png"]}])
    res = convert_file(src, "llamafactory", on_error="skip")
    assert res.samples[0]["messages"][0]["content"] == [
        {"type": "image", "path": _abs(media, "img/a.png")}, {"type": "text", "text": "Describe\nbriefly"}]
    assert res.error_counts() == {"media_not_allowed": 1}


# --------------------------------------------------------------------------- ms-swift


def test_swift(media: Path):
    src = _write_jsonl(media / "swift.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Is this <image> larger?"},
                      {"role": "assistant", "content": "yes"}], "images": ["img/a.png", "img/b.png"]},
        # ms-swift puts files without a placeholder at the start of the first user turn.
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Listen."},
                      {"role": "assistant", "content": "ok"}], "audios": ["audio/n.wav"]},
        {"query": "<image>Now?", "response": "no", "history": [["Hi", "Hello"]], "images": ["img/b.png"]},
        {"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
         "images": ["img/a.png"]}])
    res = convert_file(src, "swift", on_error="skip")
    a, b, c = res.samples
    assert a["messages"][0]["content"] == [
        {"type": "image", "path": _abs(media, "img/a.png")}, {"type": "text", "text": "Is this"},
        {"type": "image", "path": _abs(media, "img/b.png")}, {"type": "text", "text": "larger?"}]
    assert b["messages"][1]["content"] == [
        {"type": "audio", "path": _abs(media, "audio/n.wav")}, {"type": "text", "text": "Listen."}]
    assert c["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "image", "path": _abs(media, "img/b.png")},
                                     {"type": "text", "text": "Now?"}]},
        {"role": "assistant", "content": "no"}]
    assert res.error_counts() == {"placeholder_mismatch": 1}
    assert res.errors[0].line == 4


# --------------------------------------------------------------------------- OpenAI


def test_openai(media: Path):
    src = _write_jsonl(media / "oai.jsonl", [{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": (media / "img/a.png").absolute().as_uri()}},
            {"type": "image_url", "image_url": {"url": "img/b.png", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "audio/n.wav", "format": "wav"}},
            {"type": "text", "text": "Answer."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]}], "answer": "same"}])
    (s,) = convert_file(src, "openai").samples
    assert s["answer"] == "same"
    assert s["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image", "path": _abs(media, "img/a.png")},
            {"type": "image", "path": _abs(media, "img/b.png")},
            {"type": "audio", "path": _abs(media, "audio/n.wav")},
            {"type": "text", "text": "Answer."}]},
        {"role": "assistant", "content": "Same."}]


def test_openai_remote_url_and_base64(media: Path):
    src = _write_jsonl(media / "remote.jsonl", [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
            {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}]},
            {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError) as e:
        convert_file(src, "openai")
    msg = str(e.value)
    assert e.value.kind == "remote_url" and f"{src}:1" in msg
    assert "https://example.com/x.png" in msg and "never downloads" in msg and "local path" in msg
    res = convert_file(src, "openai", on_error="skip")
    assert res.samples == [] and res.error_counts() == {"remote_url": 1, "inline_data": 2}


# --------------------------------------------------------------------------- detection / CLI


def test_detect_format(media: Path, tmp_path: Path):
    user_img = {"role": "user", "content": "<image>Q"}
    asst = {"role": "assistant", "content": "A"}
    cases = {
        "lf.json": ([{"messages": [user_img, asst], "images": ["img/a.png"]}], "llamafactory"),
        "lf2.jsonl": ([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
                      "llamafactory"),
        "sw.jsonl": ([{"messages": [{"role": "user", "content": "Q"}, asst], "images": ["img/a.png"]}], "swift"),
        "sw2.jsonl": ([{"query": "Q", "response": "A"}], "swift"),
        "oai.jsonl": ([{"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "img/a.png"}}]}, asst]}], "openai"),
        "ours.jsonl": ([{"messages": [{"role": "user", "content": [
            {"type": "image", "path": "img/a.png"}, {"type": "text", "text": "Q"}]}, asst]}], "ours"),
        "text.jsonl": ([{"messages": [{"role": "user", "content": "Q"}, asst]}], "ours"),
    }
    for name, (records, fmt) in cases.items():
        path = media / name
        _write_json(path, records) if name.endswith(".json") else _write_jsonl(path, records)
        assert detect_format(path) == fmt, name
    with pytest.raises(DataError, match="--from"):
        detect_format(_write_jsonl(media / "odd.jsonl", [{"foo": 1}]))


def test_cli(media: Path, tmp_path: Path, capsys):
    src = _write_json(media / "lf.json", [
        {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
         "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
         "images": ["img/a.png", "img/b.png"]}])
    out = media / "out" / "train.jsonl"
    assert main(["convert", str(src), str(out)]) == 1  # raise mode, auto-detected
    assert "placeholder" in capsys.readouterr().err and not out.exists()
    assert main([str(src), str(out), "--from", "llamafactory", "--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    assert "1 samples written" in text and "1 skipped" in text and "placeholder_mismatch 1" in text
    assert "outside" in text  # media live in ../img
    line = json.loads(out.read_text())
    assert line["messages"][0]["content"][0] == {"type": "image", "path": "../img/a.png"}
    assert not list(out.parent.glob(".*.tmp"))
    assert check_dataset([out], allow_outside_paths=True).errors == []

    tables = tmp_path / "tables"
    shutil.copytree(TABLES, tables)
    out2 = tables / "yn.jsonl"
    assert main(["--template", str(ROOT / "data_templates/templates/closed_vqa_yes_no.yaml"),
                 str(tables / "closed_vqa_yes_no.csv"), str(out2)]) == 0
    assert check_dataset([out2]).errors == []
    assert main(["--template", str(tmp_path / "nope.yaml"), str(tables / "audio_qa.csv"), str(out2)]) == 1
    assert main(["--from", "nope", str(src), str(out)]) == 2


# --------------------------------------------------------------------------- round trip


def test_ours_llamafactory_round_trip(media: Path):
    samples = [
        {"id": "s1", "task": "comparison", "answer": "larger", "messages": [
            {"role": "system", "content": "You compare studies."},
            {"role": "user", "content": [
                {"type": "text", "text": "Prior:"}, {"type": "image", "path": "img/a.png"},
                {"type": "text", "text": "Current:"}, {"type": "image", "path": "img/b.png"},
                {"type": "text", "text": "Smaller, stable or larger?"}]},
            {"role": "assistant", "content": "larger"}]},
        {"id": "s2", "messages": [
            {"role": "user", "content": [{"type": "audio", "path": "audio/n.wav"},
                                         {"type": "text", "text": "What was dictated?"}]},
            {"role": "assistant", "content": "A nodule."},
            {"role": "user", "content": [{"type": "video", "frames": ["clip/000.png", "clip/001.png"]},
                                         {"type": "text", "text": "And here?"}]},
            {"role": "assistant", "content": "Nothing."}]},
        {"id": "s3", "messages": [{"role": "user", "content": "Text only?"},
                                  {"role": "assistant", "content": "Yes."}]},
    ]
    ours = _write_jsonl(media / "ours.jsonl", samples)
    lf = media / "lf" / "data.json"
    assert llamafactory_from_ours(ours, lf) == 3
    records = json.loads(lf.read_text())
    assert records[0]["messages"][1]["content"] == "Prior:<image>Current:<image>Smaller, stable or larger?"
    assert records[0]["images"] == ["../img/a.png", "../img/b.png"]
    assert records[1]["videos"] == [["../clip/000.png", "../clip/001.png"]]
    assert records[2]["images"] == [] and records[0]["answer"] == "larger"
    assert detect_format(lf) == "llamafactory"

    back = media / "back.jsonl"
    write_jsonl(convert_file(lf, "llamafactory").samples, back)
    before, _ = load_samples(ours)
    after, _ = load_samples(back)
    assert len(before) == len(after) == 3
    for x, y in zip(before, after):
        assert (x.id, x.task, x.answer) == (y.id, y.task, y.answer)
        assert x.messages == y.messages  # same roles, parts, order and (absolute) media paths
