"""Dataset checker and media readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from finetune.data import check as check_mod
from finetune.data.check import check_dataset
from finetune.data.media import (
    MediaError,
    audio_duration,
    image_size,
    list_video_frames,
    load_audio,
    load_image,
    load_video,
)
from finetune.data.schema import Part, load_samples

EXAMPLES = Path(__file__).resolve().parents[1] / "data_templates" / "examples"


def _png(path: Path, w: int = 32, h: int = 24, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    # Noise keeps the PNG large enough that half of it is a real truncation.
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


def _wav(path: Path, seconds: float = 0.1, sr: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * sr)
    data = 0.5 * np.sin(np.linspace(0, 100, n, dtype=np.float32))
    sf.write(path, np.stack([data] * channels, axis=1) if channels > 1 else data, sr)
    return path


def user(*parts):
    return {"role": "user", "content": list(parts)}


def asst(text="ok"):
    return {"role": "assistant", "content": text}


def img(p):
    return {"type": "image", "path": p}


def aud(p):
    return {"type": "audio", "path": p}


TXT = {"type": "text", "text": "Q?"}


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """A dataset folder with good and broken media files."""
    _png(tmp_path / "img" / "good.png")
    trunc = _png(tmp_path / "img" / "trunc.png", 64, 64)
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    (tmp_path / "img" / "garbage.png").write_bytes(b"not a png at all")
    _wav(tmp_path / "audio" / "good.wav")
    sf.write(tmp_path / "audio" / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "audio" / "bad.wav").write_bytes(b"RIFF\x00\x00junk")
    for i in range(4):
        _png(tmp_path / "clip" / f"f{i}.png", 8, 8, i)
    (tmp_path / "emptyclip").mkdir()
    return tmp_path


def _write_lines(path: Path, lines: list) -> Path:
    with open(path, "wb") as fh:
        for x in lines:
            if isinstance(x, bytes):
                fh.write(x + b"\n")
            elif isinstance(x, str):
                fh.write(x.encode() + b"\n")
            else:
                fh.write(json.dumps(x).encode() + b"\n")
    return path


def test_mixed_file_reports_every_problem(ds):
    good = {"messages": [user(img("img/good.png"), TXT), asst()]}
    lines = [
        good,                                                                   # 1 ok
        b'{"messages": "caf\xe9"}',                                             # 2 encoding
        '{"messages": [',                                                       # 3 json
        {"messages": [{"role": "doctor", "content": "x"}, asst()]},             # 4 unknown_role
        {"messages": [user(TXT), user(TXT), asst()]},                           # 5 same_role_twice
        {"messages": [user(TXT), asst(), user(TXT)]},                           # 6 not_ending_with_assistant
        {"messages": [user(img("img/missing.png")), asst()]},                   # 7 missing_file
        {"messages": [user(img("../../etc/passwd")), asst()]},                  # 8 outside_path
        {"messages": [user(img("img/trunc.png"), TXT), asst()]},                # 9 unreadable_image
        {"messages": [user(aud("audio/empty.wav"), TXT), asst()]},              # 10 empty_audio
        {"messages": [user(aud("audio/bad.wav"), TXT), asst()]},                # 11 unreadable_audio
        {"messages": [user({"type": "video", "path": "emptyclip"}), asst()]},   # 12 unreadable_video
        {"messages": [user({"type": "pic", "path": "img/good.png"}), asst()]},  # 13 unknown_part_type
        {"messages": [user(TXT), asst()], "answer": 1},                         # 14 bad_answer
        "",                                                                     # blank: skipped
        {"messages": [user(aud("audio/good.wav"), img("img/good.png")), asst()]},  # 16 ok
        {"messages": [user({"type": "video", "path": "clip"}, TXT), asst()]},   # 17 ok
        {"messages": [{"role": "system", "content": "s"}, user(TXT), asst()]},  # 18 ok
        {"messages": [user(img("img/garbage.png"), img("img/trunc.png")), asst()]},  # 19 two media errors
    ]
    p = _write_lines(ds / "train.jsonl", lines)
    report = check_dataset([p])

    got = {(e.line, e.kind) for e in report.errors}
    assert got == {
        (2, "encoding"), (3, "json"), (4, "unknown_role"), (5, "same_role_twice"),
        (6, "not_ending_with_assistant"), (7, "missing_file"), (8, "outside_path"),
        (9, "unreadable_image"), (10, "empty_audio"), (11, "unreadable_audio"),
        (12, "unreadable_video"), (13, "unknown_part_type"), (14, "bad_answer"),
        (19, "unreadable_image"),
    }
    assert [e.field for e in report.errors if e.line == 19] == [
        "messages[0].content[0].path", "messages[0].content[1].path"]
    assert report.n_samples == 18
    assert report.n_ok == 4
    assert report.error_counts()["unreadable_image"] == 3
    # Samples that parsed count towards the mix, even if a media file is broken.
    assert report.modality_counts == {"image": 3, "text-only": 1, "audio": 2,
                                      "image+audio": 1, "video": 2}

    text = report.format()
    for e in report.errors:
        assert str(e) in text
        assert str(e).startswith(f"{p}:{e.line}: ")
    assert "18 samples, 4 ok, 15 errors" in text
    assert "unreadable_image" in text.split("errors by kind:")[1]
    assert "modality mix:" in text

    # open_media=False keeps only structural problems.
    quick = check_dataset([p], open_media=False)
    assert {e.kind for e in quick.errors}.isdisjoint(
        {"unreadable_image", "empty_audio", "unreadable_audio", "unreadable_video"})
    assert quick.n_ok == 9


def test_token_counts_too_long_and_encode(ds):
    lines = [{"messages": [user(TXT), asst("x" * n)]} for n in (5, 50, 500)]
    lines.append({"messages": [user(TXT), asst("boom")]})
    p = _write_lines(ds / "t.jsonl", lines)

    def counter(sample):
        text = sample.messages[-1].text()
        if text == "boom":
            raise RuntimeError("processor exploded")
        return len(text)

    report = check_dataset([p], token_counter=counter, max_tokens=100)
    assert report.token_counts == [5, 50, 500]
    assert {(e.line, e.kind) for e in report.errors} == {(3, "too_long"), (4, "encode")}
    too_long = next(e for e in report.errors if e.kind == "too_long")
    assert "raise data.max_tokens or shorten the sample" in str(too_long)
    assert report.n_ok == 2
    text = report.format()
    assert "token lengths (n=3): min 5, median 50, p95 455, max 500" in text
    assert text.count(" | ") == 8

    assert check_dataset([p], open_media=False).token_counts is None


def test_missing_and_empty_dataset_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    report = check_dataset([tmp_path / "nope.jsonl", empty])
    assert [(e.kind, e.file) for e in report.errors] == [
        ("missing_file", str(tmp_path / "nope.jsonl")), ("empty", str(empty))]


def test_main_exit_codes(ds, capsys):
    good = _write_lines(ds / "good.jsonl", [{"messages": [user(img("img/good.png")), asst()]}])
    bad = _write_lines(ds / "bad.jsonl", [{"messages": [user(img("img/trunc.png")), asst()]}])
    assert check_mod.main([str(good)]) == 0
    assert "1 samples, 1 ok, 0 errors" in capsys.readouterr().out
    assert check_mod.main([str(bad)]) == 1
    assert "unreadable_image" in capsys.readouterr().out
    assert check_mod.main([str(bad), "--no-media"]) == 0


def test_examples_pass():
    files = sorted(EXAMPLES.glob("*.jsonl"))
    assert {f.name for f in files} == {"closed_vqa.jsonl", "report_generation.jsonl",
                                       "audio_question.jsonl", "multi_image.jsonl"}
    report = check_dataset(files)
    assert report.errors == [], report.format()
    assert report.n_ok == report.n_samples >= 8
    for f in files:
        samples, _ = load_samples(f)
        assert 2 <= len(samples) <= 3
    multi, _ = load_samples(EXAMPLES / "multi_image.jsonl")
    assert all(len(s.media()) == 2 for s in multi)
    for media_file in list((EXAMPLES / "img").iterdir()) + list((EXAMPLES / "audio").iterdir()):
        assert media_file.stat().st_size < 20_000


# --- media readers ---------------------------------------------------------

def test_load_image_rgb_and_size(ds):
    im = load_image(ds / "img" / "good.png")
    assert im.mode == "RGB" and im.size == (32, 24)
    assert image_size(ds / "img" / "good.png") == (32, 24)


def test_truncated_image_fails_on_load_but_header_reads(ds):
    assert image_size(ds / "img" / "trunc.png") == (64, 64)
    with pytest.raises(MediaError, match="trunc.png"):
        load_image(ds / "img" / "trunc.png")


def test_sixteen_bit_image_is_stretched(tmp_path):
    arr = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255 and 0 < out[0, 1, 0] < 255


def test_medical_formats_branch(tmp_path):
    for name in ("a.dcm", "b.nii", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(MediaError, match=r"\[medical\] extra"):
            load_image(tmp_path / name)


def test_stereo_44k_loads_as_mono_16k(tmp_path):
    sr = 44100
    t = np.arange(sr // 2) / sr  # 0.5 s
    left = 0.8 * np.sin(2 * np.pi * 440 * t)
    right = -0.2 * np.ones_like(t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), sr, subtype="FLOAT")
    wav = load_audio(tmp_path / "s.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == 8000
    assert np.abs(wav).max() <= 1.0
    # Mean of channels: the DC offset of the right channel halves.
    assert abs(float(wav[1000:7000].mean()) + 0.1) < 0.01
    assert audio_duration(tmp_path / "s.wav") == pytest.approx(0.5)
    assert len(load_audio(tmp_path / "s.wav", sampling_rate=None)) == sr // 2


def test_audio_errors(ds):
    with pytest.raises(MediaError) as info:
        load_audio(ds / "audio" / "empty.wav")
    assert info.value.kind == "empty_audio"
    with pytest.raises(MediaError, match="WAV, FLAC, OGG") as info:
        load_audio(ds / "audio" / "bad.wav")
    assert info.value.kind == "unreadable_audio"
    with pytest.raises(MediaError):
        load_audio(ds / "audio" / "nope.wav")


def test_video_frames(tmp_path):
    for i in (10, 2, 1, 0, 11, 3):
        _png(tmp_path / "clip" / f"frame_{i}.png", 8, 8, i)
    (tmp_path / "clip" / "notes.txt").write_text("x")
    frames = list_video_frames(tmp_path / "clip")
    assert [f.name for f in frames] == [f"frame_{i}.png" for i in (0, 1, 2, 3, 10, 11)]

    out = load_video(Part("video", path=tmp_path / "clip"), max_frames=3)
    assert len(out) == 3 and all(im.mode == "RGB" for im in out)
    assert len(load_video(Part("video", path=tmp_path / "clip"), max_frames=100)) == 6
    listed = Part("video", frames=frames[:2])
    assert len(load_video(listed, max_frames=8)) == 2
    # A declared source rate lets fps thin the frames before the cap.
    with_fps = Part("video", path=tmp_path / "clip", extra={"fps": 2})
    assert len(load_video(with_fps, max_frames=8, fps=1)) == 3

    with pytest.raises(MediaError):
        list_video_frames(tmp_path / "clip" / "notes.txt")


def test_video_file_without_pyav(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    (tmp_path / "v.mp4").write_bytes(b"\x00")
    with pytest.raises(MediaError, match="pip install av"):
        load_video(Part("video", path=tmp_path / "v.mp4"), max_frames=4)


def test_decode_record_skips_unchanged_files_only(tmp_path, monkeypatch):
    """A file that decoded is not decoded again while unchanged; a changed or broken one is."""
    import os

    from finetune.data import media as media_mod
    from finetune.data.samples import MediaChecker

    ok = _png(tmp_path / "ok.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    parts = {p: Part(type="image", path=p) for p in (ok, bad)}
    calls = []
    real = media_mod.load_images
    monkeypatch.setattr(media_mod, "load_images", lambda part, **kw: (calls.append(part.path), real(part, **kw))[1])
    record = tmp_path / "cache" / "record.json"

    def run():
        calls.clear()
        checker = MediaChecker(record)
        found = {p: list(checker.problems(part, "f")) for p, part in parts.items()}
        checker.save()
        return found

    first = run()
    assert sorted(calls) == sorted([ok, bad]) and not first[ok] and first[bad]
    second = run()
    assert calls == [bad] and not second[ok] and second[bad]  # the failure is never remembered
    st = ok.stat()
    os.utime(ok, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    run()
    assert sorted(calls) == sorted([ok, bad])
    ok.write_bytes(b"not an image any more")  # broken after it was recorded: size and time differ
    assert run()[ok]


def test_preference_pairs_are_checked_and_bad_pairs_named_by_line(ds):
    """Pairs in our form, in LLaMA-Factory v1's and ms-swift's: both answers present, different,
    on the last turn, prompts identical; each bad pair is named by file:line with its fix, and
    media in a pair's prompt are decoded like any other (issue 29)."""
    prompt = [user(img("img/good.png"), aud("audio/good.wav"), TXT)]

    def pair(**last):
        return {"messages": prompt + [{"role": "assistant", **last}]}

    def v1(chosen_q, rejected_q):
        turn = lambda q, a: [{"role": "user", "content": [{"type": "text", "value": q}], "loss_weight": 0.0},  # noqa: E731
                             {"role": "assistant", "content": [{"type": "text", "value": a}], "loss_weight": 1.0}]
        return {"chosen_messages": turn(chosen_q, "Yes."), "rejected_messages": turn(rejected_q, "No.")}

    ours = _write_lines(ds / "pairs.jsonl", [
        pair(chosen="Yes.", rejected="No."),                                      # 1 ok
        pair(chosen="Yes."),                                                      # 2 no rejected
        pair(chosen="Yes.", rejected="Yes."),                                     # 3 the same answer
        {"messages": [user(TXT), {"role": "assistant", "chosen": "A", "rejected": "B"}, user(TXT), asst()]},  # 4
        {"messages": [user(img("img/garbage.png"), TXT), {"role": "assistant", "chosen": "A", "rejected": "B"}]},  # 5
    ])
    report = check_dataset([ours])
    assert report.n_samples == 5 and report.n_ok == 1, report.format()
    by_line = {e.line: e for e in report.errors}
    assert sorted(by_line) == [2, 3, 4, 5], report.format()
    assert str(by_line[2]).startswith(f"{ours}:2: messages[1].rejected: the preference turn has no 'rejected'")
    assert "rejected answer is the chosen one" in str(by_line[3]) and "Fix:" in str(by_line[3])
    assert "not the last" in str(by_line[4]) and "Fix: put the two answers on the last turn" in str(by_line[4])
    assert by_line[5].kind == "unreadable_image"

    lf = _write_lines(ds / "v1.jsonl", [v1("Q", "Q"), v1("Q", "Another question")])
    report = check_dataset([lf])
    assert report.n_ok == 1 and len(report.errors) == 1, report.format()
    (e,) = report.errors
    assert e.line == 2 and e.kind == "bad_pair" and "differ before their answers" in str(e) and "same prompt" in e.fix

    swift = _write_lines(ds / "swift.jsonl", [
        {"messages": [{"role": "user", "content": "<image><audio>Lesion?"}, asst("Yes.")],
         "rejected_response": "No.", "images": ["img/good.png"], "audios": ["audio/good.wav"]}])
    report = check_dataset([swift])
    assert report.errors == [] and report.modality_counts == {"image+audio": 1}, report.format()
