"""A corpus of broken samples, one per failure kind, written next to a few good ones.

`write_corpus(folder)` writes `train.jsonl` (good and broken lines interleaved) and the media
they use, and returns {line: kind} for the broken lines. Each broken line has exactly one
problem, so every checker must name exactly that kind at exactly that line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def _good(i: int) -> dict:
    return {"id": f"good-{i}", "answer": "yes", "messages": [
        {"role": "system", "content": "You are a radiology assistant."},
        {"role": "user", "content": [{"type": "image", "path": "ok.png"}, {"type": "text", "text": "Is there a lesion?"}]},
        {"role": "assistant", "content": "Yes. A small lesion."}]}


def _with_part(part: dict) -> dict:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Look."}]},
                         {"role": "assistant", "content": "No."}]}


U = {"role": "user", "content": "Question?"}
A = {"role": "assistant", "content": "Answer."}


def write_corpus(folder: Path) -> dict[int, str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 80, 3)) * 255).astype("uint8")).save(folder / "ok.png")
    png = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    (folder / "not_audio.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(200))
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    full = folder / "full.wav"
    sf.write(full, (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    (folder / "cut.wav").write_bytes(full.read_bytes()[:12000])  # a copy cut short
    (folder / "voice.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(100))
    sf.write(folder / "stereo44k.wav", (rng.standard_normal((44100, 2)) * 0.1).astype(np.float32), 44100)
    (folder / "clip").mkdir(exist_ok=True)
    for k in range(3):
        (folder / "clip" / f"{k:03d}.png").write_bytes(png if k != 1 else png[:40])
    (folder / "notes.txt").write_text("not an image")
    from bombs import png as png_bomb, wav as wav_bomb

    png_bomb(folder / "claims.png", 50000, 50000, full=False)  # a header claiming 2.5 G pixels
    wav_bomb(folder / "slow.wav", rate=1, n_samples=20000)  # 20000 s at 1 Hz: 320 M samples at 16 kHz
    if not (folder / "scan.png").exists():
        os.mkfifo(folder / "scan.png")  # reading it would block forever
    from media_samples import write_dicom  # a valid CT: the failure is the sample's window option

    write_dicom(folder / "ct.dcm", np.full((32, 32), 1000, dtype=np.uint16), RescaleSlope=1, RescaleIntercept=-1024)

    broken: list[tuple[object, str]] = [
        ('{"messages": [{"role": "user"', "json"),
        (b'{"messages": "caf\xe9"}', "encoding"),
        ([1, 2, 3], "not_object"),
        ({"conversations": [U, A]}, "missing_messages"),
        ({"messages": "hello"}, "bad_messages"),
        ({"messages": []}, "empty"),
        ({"messages": ["hello", A]}, "bad_message"),
        ({"messages": [{"content": "hi"}, A]}, "missing_role"),
        ({"messages": [{"role": "doctor", "content": "hi"}, A]}, "unknown_role"),
        ({"messages": [U, {"role": "system", "content": "late"}, A]}, "system_not_first"),
        ({"messages": [U, U, A]}, "same_role_twice"),
        ({"messages": [U]}, "no_assistant"),
        ({"messages": [U, A, U]}, "not_ending_with_assistant"),
        ({"messages": [{"role": "user"}, A]}, "missing_content"),
        ({"messages": [{"role": "user", "content": 42}, A]}, "bad_content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, "bare string"]}, A]}, "bad_part"),
        (_with_part({"type": "picture", "path": "ok.png"}), "unknown_part_type"),
        (_with_part({"type": "image"}), "missing_path"),
        ({"messages": [U, {"role": "assistant", "content": [{"type": "image", "path": "ok.png"}]}]},
         "media_not_allowed"),
        (_with_part({"type": "image", "path": "nowhere.png"}), "missing_file"),
        (_with_part({"type": "image", "path": "../escape.png"}), "outside_path"),
        ({**_good(0), "id": [1]}, "bad_id"),
        ({**_good(0), "answer": 3}, "bad_answer"),
        ({**_good(0), "task": 5}, "bad_task"),
        (_with_part({"type": "image", "path": "truncated.png"}), "unreadable_image"),
        (_with_part({"type": "image", "path": "notes.txt"}), "unreadable_image"),
        (_with_part({"type": "audio", "path": "not_audio.wav"}), "unreadable_audio"),
        (_with_part({"type": "audio", "path": "empty.wav"}), "empty_audio"),
        (_with_part({"type": "audio", "path": "cut.wav"}), "unreadable_audio"),
        (_with_part({"type": "audio", "path": "voice.m4a"}), "unreadable_audio"),  # unsupported codec
        (_with_part({"type": "video", "path": "clip"}), "unreadable_video"),
        (_with_part({"type": "image", "path": "ct.dcm", "window": "lungs"}), "bad_media_option"),
        ({"messages": [U, {"role": "assistant", "content": "very long answer " * 200}]}, "too_long"),
        # resource bombs (issue 25): refused from headers, before anything is parsed or decoded
        (_with_part({"type": "image", "path": "claims.png"}), "too_large"),
        (_with_part({"type": "audio", "path": "slow.wav"}), "too_large"),
        (_with_part({"type": "image", "path": "scan.png"}), "not_regular_file"),
        ("[" * 100_000 + "]" * 100_000, "too_deep"),
        ({"messages": [U, {"role": "assistant", "content": "x" * 1_000_001}]}, "text_too_long"),
    ]
    lines: list[bytes] = []
    expected: dict[int, str] = {}
    good = 0
    for raw, kind in broken:
        for _ in range(2 if good < 8 else 0):  # good samples interleaved, so training has data
            lines.append(json.dumps(_good(good)).encode())
            good += 1
        if isinstance(raw, bytes):
            lines.append(raw)
        elif isinstance(raw, str):
            lines.append(raw.encode())
        else:
            lines.append(json.dumps(raw).encode())
        expected[len(lines)] = kind
    # resampled, not refused: a stereo 44.1 kHz recording is a good sample
    lines.append(json.dumps(_with_part({"type": "audio", "path": "stereo44k.wav"})).encode())
    (folder / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected
