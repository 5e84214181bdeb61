"""Validation rules of the JSONL sample schema."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.schema import (
    DataError,
    Message,
    Part,
    Sample,
    iter_jsonl,
    load_samples,
    parse_sample,
)


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """A dataset folder with one image, one audio file and a frame folder."""
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"RIFF")  # existence is all parse_sample checks
    (tmp_path / "clip").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "clip" / f"{i}.png")
    return tmp_path


def user(*parts):
    return {"role": "user", "content": list(parts)}


def asst(text="ok"):
    return {"role": "assistant", "content": text}


IMG = {"type": "image", "path": "img/a.png"}
TXT = {"type": "text", "text": "What is shown?"}


def parse(obj, base: Path, **kw) -> Sample:
    return parse_sample(obj, source="train.jsonl", line=7, base_dir=base, **kw)


def test_good_sample_parses_with_absolute_paths(ds):
    obj = {
        "id": 5,
        "answer": "yes",
        "task": "vqa",
        "split": "train",
        "messages": [
            {"role": "system", "content": "Be brief."},
            user(IMG, {"type": "audio", "path": "audio/a.wav"},
                 {"type": "video", "path": "clip"},
                 {"type": "video", "frames": ["clip/0.png", "clip/1.png"]},
                 {"type": "text", "text": "Q?", "lang": "en"},
                 {"type": "image", "path": "./img/../img/a.png", "window": "lung"}),
            asst("Yes."),
        ],
    }
    s = parse(obj, ds)
    assert s.id == "5" and s.answer == "yes" and s.task == "vqa"
    assert s.meta == {"split": "train"}
    assert s.where == "train.jsonl:7"
    assert [m.role for m in s.messages] == ["system", "user", "assistant"]
    media = s.media()
    assert [p.type for p in media] == ["image", "audio", "video", "video", "image"]
    assert media[0].path == (ds / "img" / "a.png").resolve()
    assert media[0].path.is_absolute()
    assert media[2].path == (ds / "clip").resolve()
    assert media[3].frames == [(ds / "clip" / "0.png").resolve(), (ds / "clip" / "1.png").resolve()]
    assert media[4].extra == {"window": "lung"}
    assert media[4].path == media[0].path
    assert s.messages[1].parts[4].extra == {"lang": "en"}
    assert s.modalities() == {"text", "image", "audio", "video"}
    assert s.messages[2].text() == "Yes."
    assert s.messages[0].parts == [Part(type="text", text="Be brief.")]


def test_message_text_concatenates_text_parts():
    m = Message(role="user", parts=[Part("text", text="a"), Part("image", path=Path("/x")),
                                    Part("text", text="b")])
    assert m.text() == "ab"


# (name, object, kind, field)
BAD = [
    ("not_object", ["messages"], "not_object", ""),
    ("missing_messages", {"conversations": []}, "missing_messages", "messages"),
    ("messages_not_list", {"messages": "hi"}, "bad_messages", "messages"),
    ("messages_empty", {"messages": []}, "empty", "messages"),
    ("message_not_object", {"messages": ["hi", asst()]}, "bad_message", "messages[0]"),
    ("missing_role", {"messages": [{"from": "human", "value": "x"}, asst()]}, "missing_role", "messages[0]"),
    ("unknown_role", {"messages": [{"role": "usr", "content": "x"}, asst()]}, "unknown_role", "messages[0].role"),
    ("system_not_first", {"messages": [user(TXT), {"role": "system", "content": "s"}, asst()]},
     "system_not_first", "messages[1].role"),
    ("no_assistant", {"messages": [user(TXT)]}, "no_assistant", "messages"),
    ("not_ending_with_assistant", {"messages": [user(TXT), asst(), user(TXT)]},
     "not_ending_with_assistant", "messages[2].role"),
    ("same_role_twice", {"messages": [user(TXT), user(TXT), asst()]}, "same_role_twice", "messages[1].role"),
    ("assistant_twice", {"messages": [user(TXT), asst(), asst()]}, "same_role_twice", "messages[2].role"),
    ("missing_content", {"messages": [{"role": "user"}, asst()]}, "missing_content", "messages[0]"),
    ("content_wrong_type", {"messages": [{"role": "user", "content": 3}, asst()]},
     "bad_content", "messages[0].content"),
    ("content_dict", {"messages": [{"role": "user", "content": TXT}, asst()]},
     "bad_content", "messages[0].content"),
    ("content_empty_string", {"messages": [user(TXT), asst("  ")]}, "empty", "messages[1].content"),
    ("content_empty_list", {"messages": [{"role": "user", "content": []}, asst()]},
     "empty", "messages[0].content"),
    ("part_not_object", {"messages": [user("hi"), asst()]}, "bad_part", "messages[0].content[0]"),
    ("part_without_type", {"messages": [user({"text": "hi"}), asst()]}, "bad_part", "messages[0].content[0]"),
    ("unknown_part_type", {"messages": [user({"type": "imgae", "path": "img/a.png"}), asst()]},
     "unknown_part_type", "messages[0].content[0].type"),
    ("text_without_text", {"messages": [user({"type": "text", "content": "x"}), asst()]},
     "bad_part", "messages[0].content[0].text"),
    ("text_not_string", {"messages": [user({"type": "text", "text": 4}), asst()]},
     "bad_part", "messages[0].content[0].text"),
    ("text_empty", {"messages": [user(IMG, {"type": "text", "text": ""}), asst()]},
     "empty", "messages[0].content[1].text"),
    ("image_without_path", {"messages": [user({"type": "image", "image": "img/a.png"}), asst()]},
     "missing_path", "messages[0].content[0]"),
    ("audio_without_path", {"messages": [user({"type": "audio"}), asst()]},
     "missing_path", "messages[0].content[0]"),
    ("video_without_path", {"messages": [user({"type": "video"}), asst()]},
     "missing_path", "messages[0].content[0]"),
    ("video_empty_frames", {"messages": [user({"type": "video", "frames": []}), asst()]},
     "bad_part", "messages[0].content[0].frames"),
    ("video_path_and_frames", {"messages": [user({"type": "video", "path": "clip", "frames": ["clip/0.png"]}), asst()]},
     "bad_part", "messages[0].content[0]"),
    ("path_not_string", {"messages": [user({"type": "image", "path": 3}), asst()]},
     "bad_part", "messages[0].content[0].path"),
    ("media_in_assistant", {"messages": [user(TXT), {"role": "assistant", "content": [IMG]}]},
     "media_not_allowed", "messages[1].content[0]"),
    ("media_in_system", {"messages": [{"role": "system", "content": [IMG]}, user(TXT), asst()]},
     "media_not_allowed", "messages[0].content[0]"),
    ("missing_file", {"messages": [user({"type": "image", "path": "img/x.png"}), asst()]},
     "missing_file", "messages[0].content[0].path"),
    ("missing_frame", {"messages": [user({"type": "video", "frames": ["clip/0.png", "clip/9.png"]}), asst()]},
     "missing_file", "messages[0].content[0].frames[1]"),
    ("outside_dotdot", {"messages": [user({"type": "image", "path": "../outside.png"}), asst()]},
     "outside_path", "messages[0].content[0].path"),
    ("answer_not_string", {"messages": [user(TXT), asst()], "answer": 5}, "bad_answer", "answer"),
    ("id_not_string", {"messages": [user(TXT), asst()], "id": [1]}, "bad_id", "id"),
    ("task_not_string", {"messages": [user(TXT), asst()], "task": 1}, "bad_task", "task"),
]


@pytest.mark.parametrize("obj,kind,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_rule_raises_located_error(ds, obj, kind, field):
    with pytest.raises(DataError) as info:
        parse(obj, ds)
    e = info.value
    assert (e.kind, e.field) == (kind, field)
    assert (e.file, e.line) == ("train.jsonl", 7)
    text = str(e)
    assert text.startswith("train.jsonl:7: ")
    if field:
        assert text.startswith(f"train.jsonl:7: {field}: ")
    assert ". Fix: " in text and e.fix and e.problem


def test_message_format_matches_spec(ds):
    with pytest.raises(DataError) as info:
        parse({"messages": [user({"type": "image", "path": "img/x.png"}), asst()]}, ds)
    text = str(info.value)
    assert text.startswith("train.jsonl:7: messages[0].content[0].path: file 'img/x.png' does not exist")
    assert text.endswith("Fix: check the path; paths are relative to the dataset file's folder")


def test_did_you_mean(ds):
    with pytest.raises(DataError, match="did you mean 'user'"):
        parse({"messages": [{"role": "usr", "content": "x"}, asst()]}, ds)
    with pytest.raises(DataError, match="did you mean 'assistant'"):
        parse({"messages": [user(TXT), {"role": "gpt", "content": "x"}]}, ds)
    with pytest.raises(DataError, match="did you mean 'image'"):
        parse({"messages": [user({"type": "imgae", "path": "img/a.png"}), asst()]}, ds)


def test_same_role_says_merge(ds):
    with pytest.raises(DataError, match="merge them"):
        parse({"messages": [user(TXT), user(TXT), asst()]}, ds)


def test_outside_path_and_override(ds, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(other / "o.png")
    absolute = {"messages": [user({"type": "image", "path": str(other / "o.png")}), asst()]}
    with pytest.raises(DataError) as info:
        parse(absolute, ds)
    assert info.value.kind == "outside_path"
    assert "data.allow_outside_paths: true" in str(info.value)
    s = parse(absolute, ds, allow_outside_paths=True)
    assert s.media()[0].path == (other / "o.png").resolve()

    # A symlink inside the folder that points outside is still outside.
    link = ds / "img" / "link.png"
    link.symlink_to(other / "o.png")
    linked = {"messages": [user({"type": "image", "path": "img/link.png"}), asst()]}
    with pytest.raises(DataError) as info:
        parse(linked, ds)
    assert info.value.kind == "outside_path"
    assert parse(linked, ds, allow_outside_paths=True).media()[0].path == (other / "o.png").resolve()

    # Absolute paths inside the dataset folder are fine.
    inside = {"messages": [user({"type": "image", "path": str(ds / "img" / "a.png")}), asst()]}
    assert parse(inside, ds).media()[0].path == (ds / "img" / "a.png").resolve()


def test_check_files_false_skips_existence(ds):
    obj = {"messages": [user({"type": "image", "path": "img/nope.png"}), asst()]}
    s = parse(obj, ds, check_files=False)
    assert s.media()[0].path == (ds / "img" / "nope.png").resolve()


def test_iter_jsonl_encoding_json_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"messages": []})
    p.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n\n   \n" + b'{"a": "caf\xe9"}\n' + b'{"a": 1,, }\n'
                  + b"{\n")
    out = list(iter_jsonl(p))
    assert [n for n, _ in out] == [1, 4, 5, 6]
    assert out[0][1] == {"messages": []}
    assert isinstance(out[1][1], DataError) and out[1][1].kind == "encoding"
    e = out[2][1]
    assert isinstance(e, DataError) and e.kind == "json" and "column 9" in e.problem
    assert str(e).startswith(f"{p}:5: invalid JSON at column 9")
    assert "one complete sample per line" in out[3][1].fix


def _write(path: Path, objs: list) -> Path:
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n",
                    encoding="utf-8")
    return path


def test_load_samples_raise_and_skip(ds):
    good = {"messages": [user(IMG, TXT), asst("yes")], "answer": "yes"}
    p = _write(ds / "train.jsonl", [good, "{broken", {"messages": [user(TXT)]}, good])
    with pytest.raises(DataError) as info:
        load_samples(p)
    assert info.value.kind == "json" and info.value.line == 2

    samples, errors = load_samples(p, on_error="skip")
    assert [s.line for s in samples] == [1, 4]
    assert all(s.source == str(p) for s in samples)
    assert samples[0].media()[0].path == (ds / "img" / "a.png").resolve()
    assert [(e.kind, e.line) for e in errors] == [("json", 2), ("no_assistant", 3)]

    with pytest.raises(ValueError):
        load_samples(p, on_error="ignore")


def test_load_samples_resolves_against_file_folder(ds, monkeypatch, tmp_path_factory):
    # Paths are relative to the JSONL file, not to the current directory.
    p = _write(ds / "train.jsonl", [{"messages": [user(IMG), asst()]}])
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    samples, _ = load_samples(p)
    assert samples[0].media()[0].path == (ds / "img" / "a.png").resolve()


def test_data_error_pickles():
    e = DataError("json", "bad", "fix it", file="f.jsonl", line=3, field="messages")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.kind, e2.file, e2.line, e2.field, str(e2)) == (e.kind, e.file, e.line, e.field, str(e))
    assert isinstance(e2, ValueError)
