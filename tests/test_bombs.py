"""Resource bombs through `python -m finetune data check` under a 4 GB address-space limit (issue 25).

Each bomb sits between two good samples. It must come out as one located error (file:line, the cap
or the reason, the fix), with no traceback, within a bounded time and memory, while the good samples
are still checked and reported ok. The bombs are built in code (tests/bombs.py) and are small on
disk; what they claim or expand to is not.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

import bombs

# several processes or a compiled library each: not in make test-fast
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 4 << 30  # bytes of address space for the checker's process, as in the probes
TIMEOUT = 60  # seconds; a bomb is refused from its header in well under one


# the peak is this process's own VmHWM: ru_maxrss would carry the forking pytest process's high-water
# mark across fork and exec (a suite that has loaded models reads >1 GB for every child)
_LAUNCH = ("import atexit, re, runpy, sys; "
           "atexit.register(lambda: print('peak-rss-mb:', int(re.search(r'VmHWM:\\s+(\\d+)', "
           "open('/proc/self/status').read()).group(1)) // 1024, file=sys.stderr)); "
           "sys.argv = ['finetune', *sys.argv[1:]]; runpy.run_module('finetune', run_name='__main__')")


def run_check(*args: str, timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float, int]:
    """`python -m finetune data check ARGS` under RLIMIT_AS = 4 GB: (result, seconds, peak RSS in MB, -1 when
    the process died before saying). A run still going at `timeout` is killed and fails the test (a hang)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, "data", "check", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            preexec_fn=limit)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"data check {' '.join(args)[:200]} did not finish in {timeout} s (a hang); output: {out[-500:]}")
    seconds = time.time() - t0
    peak = re.search(r"peak-rss-mb: (\d+)", err)
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seconds,
            int(peak.group(1)) if peak else -1)


def _sample(kind: str, path: str) -> dict:
    return bombs.media_sample(kind, path)


def _build(folder: Path) -> dict[str, tuple[list, str, str, list[str]]]:
    """{name: (the bomb's JSONL lines, expected kind, a word its message must hold, extra CLI args)}."""
    f = folder
    b: dict[str, tuple[list, str, str, list[str]]] = {}
    # the table
    bombs.rle_dicom(f / "rle.dcm", 20000)
    b["rle_dicom_20000"] = ([_sample("image", "rle.dcm")], "too_large", "data.max_image_pixels", [])
    bombs.nifti_gz(f / "big.nii.gz", (20000, 20000, 1))
    b["nifti_gz_20000"] = ([_sample("image", "big.nii.gz")], "too_large", "data.max_image_pixels", [])
    bombs.flac_silence(f / "tenhours.flac", 36000)
    b["flac_10h_silence"] = ([_sample("audio", "tenhours.flac")], "too_large", "data.max_audio_seconds", [])
    bombs.png(f / "deep16.png", 13000, 13000, bit_depth=16)
    b["png16_13000"] = ([_sample("image", "deep16.png")], "too_large", "data.max_image_pixels", [])
    b["line_50mb"] = ([bombs.long_line(50 << 20)], "line_too_long", "data.max_line_bytes", [])
    b["nested_200k"] = ([bombs.deep_line(200_000)], "too_deep", "nested", [])
    bombs.mkfifo(f / "scan.png")
    b["fifo_image"] = ([_sample("image", "scan.png")], "not_regular_file", "FIFO", [])
    # more like them: headers that claim more than they hold
    bombs.png(f / "claims.png", 50000, 50000, full=False)
    b["png_header_50000"] = ([_sample("image", "claims.png")], "too_large", "data.max_image_pixels", [])
    bombs.jpeg_header(f / "claims.jpg", 60000, 60000)
    b["jpeg_header_60000"] = ([_sample("image", "claims.jpg")], "too_large", "data.max_image_pixels", [])
    bombs.gif_header(f / "claims.gif", 65535, 65535)
    b["gif_header_65535"] = ([_sample("image", "claims.gif")], "too_large", "data.max_image_pixels", [])
    bombs.dicom_header_only(f / "claims.dcm", 65535, 65535)
    b["dicom_header_65535"] = ([_sample("image", "claims.dcm")], "too_large", "data.max_image_pixels", [])
    bombs.dicom_header_only(f / "frames.dcm", 512, 512, frames=100_000)
    b["dicom_100k_frames"] = ([_sample("image", "frames.dcm")], "too_large", "data.max_volume_voxels", [])
    bombs.deflated_dicom(f / "deflated.dcm", 3 << 30)
    b["deflated_dicom_3gb"] = ([_sample("image", "deflated.dcm")], "too_large", "data.max_volume_voxels", [])
    bombs.nifti_gz(f / "volume.nii.gz", (512, 512, 30_000), full=False)
    b["nifti_volume_header"] = ([_sample("image", "volume.nii.gz")], "too_large", "data.max_volume_voxels", [])
    bombs.flac_total_samples(bombs.flac_silence(f / "lies.flac", 1), 36000 * 16000)
    b["flac_header_claims_10h"] = ([_sample("audio", "lies.flac")], "too_large", "data.max_audio_seconds", [])
    bombs.flac_total_samples(bombs.flac_silence(f / "unknown.flac", 4000), 0)
    b["flac_unknown_length_4000s"] = ([_sample("audio", "unknown.flac")], "too_large", "data.max_audio_seconds", [])
    bombs.wav(f / "slow.wav", rate=1, n_samples=20000)
    b["wav_1hz_20000_samples"] = ([_sample("audio", "slow.wav")], "too_large", "data.max_audio_seconds", [])
    bombs.wav(f / "prime.wav", rate=2**31 - 1, n_samples=1000)
    b["wav_rate_2g"] = ([_sample("audio", "prime.wav")], "unreadable_audio", "sample rate", [])
    bombs.wav(f / "short.wav", rate=16000, n_samples=1000, data_bytes=0x7FFFFFF0)
    b["wav_header_claims_2gb"] = ([_sample("audio", "short.wav")], "unreadable_audio", "truncated", [])
    bombs.mp4(f / "long.mp4", 110_000, fps=1000)
    b["mp4_110k_frames"] = ([_sample("video", "long.mp4")], "too_large", "data.max_video_frames", [])
    bombs.mp4(f / "slow.mp4", 5, fps=Fraction(1, 1000))
    b["mp4_5_frames_over_5000_s"] = ([_sample("video", "slow.mp4")], "too_large", "data.max_video_seconds", [])
    frames_list = {"messages": [{"role": "user", "content": [{"type": "video", "frames": ["ok.png"] * 110_000},
                                                             {"type": "text", "text": "What happens?"}]},
                                {"role": "assistant", "content": "Nothing."}]}
    b["frames_list_110k"] = ([frames_list], "too_large", "data.max_video_frames", [])
    b["text_2m_chars"] = ([bombs.long_line(2_400_000)], "text_too_long", "data.max_text_chars", [])
    b["nested_900_in_a_valid_sample"] = ([bombs.deep_sample(900)], "too_deep", "nested", [])
    # files that are not regular files, and paths that cannot be resolved
    bombs.mkfifo(f / "voice.wav")
    b["fifo_audio"] = ([_sample("audio", "voice.wav")], "not_regular_file", "FIFO", [])
    (f / "clip").mkdir()
    bombs.write_ok_image(f / "clip")
    (f / "clip" / "ok.png").rename(f / "clip" / "000.png")
    bombs.mkfifo(f / "clip" / "001.png")
    b["fifo_in_frame_folder"] = ([_sample("video", "clip")], "not_regular_file", "FIFO", [])
    b["fifo_in_frames_list"] = ([{"messages": [{"role": "user", "content": [{"type": "video", "frames": [
        "ok.png", "scan.png"]}, {"type": "text", "text": "Go."}]}, {"role": "assistant", "content": "Ok."}]}],
        "not_regular_file", "FIFO", [])
    os.symlink("/dev/zero", f / "zero.png")
    b["char_device_image"] = ([_sample("image", "zero.png")], "not_regular_file", "device",
                              ["--allow-outside-paths"])
    os.symlink(f / "loop_b.png", f / "loop_a.png")
    os.symlink(f / "loop_a.png", f / "loop_b.png")
    b["symlink_loop"] = ([_sample("image", "loop_a.png")], "bad_part", "symlink", [])
    b["nul_in_path"] = ([_sample("image", "scan\u0000.png")], "bad_part", "NUL", [])
    b["path_of_5000_chars"] = ([_sample("image", "x" * 5000 + ".png")], "bad_part", "too long", [])
    # JSON that parses into something no later step can use
    b["int_of_5000_digits"] = (['{"id": ' + "1" * 5000 + ', "messages": [{"role": "user", "content": "Hi."}, '
                                '{"role": "assistant", "content": "Hello."}]}'], "json", "digits", [])
    b["lone_surrogate_in_text"] = ([{"messages": [{"role": "user", "content": "Hi \ud800."},
                                                  {"role": "assistant", "content": "Hello."}]}], "encoding", "surrogate", [])
    b["lone_surrogate_in_path"] = ([_sample("image", "scan\udc80.png")], "encoding", "surrogate", [])
    b["lone_surrogate_in_id"] = ([{"id": "\udfff", "messages": [{"role": "user", "content": "Hi."},
                                                                {"role": "assistant", "content": "Hello."}]}],
                                 "encoding", "surrogate", [])
    return b


@pytest.fixture(scope="module")
def bomb_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    bombs.write_ok_image(folder)
    table = _build(folder)
    files = {}
    for name, (lines, kind, word, args) in table.items():
        files[name] = (bombs.write_dataset(folder / f"{name}.jsonl", lines), kind, word, args)
    return folder, files


BOMBS = ["rle_dicom_20000", "nifti_gz_20000", "flac_10h_silence", "png16_13000", "line_50mb", "nested_200k",
         "fifo_image", "png_header_50000", "jpeg_header_60000", "gif_header_65535", "dicom_header_65535",
         "dicom_100k_frames", "deflated_dicom_3gb", "nifti_volume_header", "flac_header_claims_10h", "flac_unknown_length_4000s",
         "wav_1hz_20000_samples", "wav_rate_2g", "wav_header_claims_2gb", "mp4_110k_frames",
         "mp4_5_frames_over_5000_s", "frames_list_110k",
         "text_2m_chars", "nested_900_in_a_valid_sample", "fifo_audio", "fifo_in_frame_folder",
         "fifo_in_frames_list", "char_device_image", "symlink_loop", "nul_in_path", "path_of_5000_chars",
         "int_of_5000_digits", "lone_surrogate_in_text", "lone_surrogate_in_path", "lone_surrogate_in_id"]


def _assert_located(res: subprocess.CompletedProcess, path: Path, line: int, kind: str, word: str) -> None:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    assert res.returncode == 1, f"exit status {res.returncode}: {out[-3000:]}"
    mine = [x for x in res.stdout.splitlines() if x.startswith(f"{path}:{line}")]
    assert mine, f"no error located at {path.name}:{line}:\n{out[-3000:]}"
    assert any(word in x and "Fix:" in x for x in mine), mine
    assert f"  {kind} " in res.stdout, f"kind {kind} not reported:\n{res.stdout[-2000:]}"


@pytest.mark.parametrize("name", BOMBS)
def test_each_bomb_is_one_located_error_in_bounded_time_and_memory(bomb_set, name):
    _, files = bomb_set
    path, kind, word, args = files[name]
    res, seconds, peak_mb = run_check(*args, str(path))
    _assert_located(res, path, 2, kind, word)
    assert "3 samples, 2 ok, 1 errors" in res.stdout, res.stdout[-2000:]  # the good ones still checked
    assert seconds < 30, f"{seconds:.0f} s"
    assert 0 < peak_mb < 1024, f"peak RSS {peak_mb} MB"  # far below the 4 GB limit, not just under it


def test_every_bomb_in_one_file_each_reported_and_every_good_sample_ok(bomb_set, tmp_path):
    folder, files = bomb_set
    lines = []
    for name in BOMBS:
        if files[name][3]:
            continue  # needs its own flag
        lines.append(files[name][0].read_text().splitlines()[1])
    mixed = folder / "everything.jsonl"
    bombs.write_dataset(mixed, lines)
    res, seconds, _ = run_check(str(mixed), timeout=120)
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode == 1, out[-3000:]
    n = len(lines)
    assert f"{n + 2} samples, 2 ok, {n} errors" in res.stdout, res.stdout[-3000:]
    for i in range(n):
        assert any(x.startswith(f"{mixed}:{i + 2}:") or x.startswith(f"{mixed}:{i + 2} ")
                   for x in res.stdout.splitlines()), f"line {i + 2} not reported"


def test_a_frame_folder_of_hard_links_to_one_large_image_is_decoded_once(tmp_path):
    """400 names of one 4096 x 4096 image: one decode, not 400 (the checker knows files by identity)."""
    bombs.write_ok_image(tmp_path)
    (tmp_path / "clip").mkdir()
    first = bombs.png(tmp_path / "clip" / "000.png", 4096, 4096)
    for k in range(1, 400):
        os.link(first, tmp_path / "clip" / f"{k:03d}.png")
    data = bombs.write_dataset(tmp_path / "d.jsonl", [_sample("video", "clip")])
    res, seconds, _ = run_check(str(data))
    assert "Traceback" not in res.stderr and "3 samples, 3 ok, 0 errors" in res.stdout, res.stdout + res.stderr
    assert seconds < 20, f"{seconds:.0f} s"


def test_a_video_frame_over_the_pixel_cap_is_refused_from_the_header(tmp_path):
    from finetune.data.media import MediaError, load_video
    from finetune.data.schema import Limits, Part, current_limits, set_limits

    path = bombs.mp4(tmp_path / "clip.mp4", 3, size=16)
    before = current_limits()
    try:
        set_limits(Limits(max_image_pixels=16 * 16 - 1))
        with pytest.raises(MediaError, match=r"16x16 = 256 pixels .*data\.max_image_pixels=255") as info:
            load_video(Part(type="video", path=path), max_frames=2)
        assert info.value.kind == "too_large"
        set_limits(Limits(max_image_pixels=16 * 16))
        assert len(load_video(Part(type="video", path=path), max_frames=2)) == 2
    finally:
        set_limits(before)


def test_a_fifo_in_a_parquet_folder_is_refused_not_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "table"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["Lesion?"], "answer": ["no"]}), folder / "a.parquet")
    bombs.mkfifo(folder / "b.parquet")
    for source in (folder, folder / "*.parquet"):  # a folder of Parquet files, a glob
        res, _, _ = run_check(str(source), timeout=60)
        out = res.stdout + res.stderr
        assert "Traceback" not in out and res.returncode == 1, out[-3000:]
        assert "not_regular_file" in res.stdout and "b.parquet" in res.stdout and "FIFO" in res.stdout, out[-3000:]


def test_a_fifo_given_as_the_dataset_file_is_refused_not_read(tmp_path):
    fifo = bombs.mkfifo(tmp_path / "train.jsonl")
    res, _, _ = run_check(str(fifo), timeout=30)
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode == 1, out
    assert "not_regular_file" in res.stdout and "FIFO" in res.stdout, out


def test_training_refuses_a_fifo_as_its_data_file_without_reading_it(tmp_path):
    from finetune.data.schema import DataError
    from finetune.data.sources import load_source
    from finetune.recipe import load_recipe

    fifo = bombs.mkfifo(tmp_path / "train.jsonl")
    recipe = load_recipe("medical-tiny", [f"data.train={fifo}", "data.demo="])
    with pytest.raises(DataError, match="FIFO") as info:
        load_source(str(fifo), recipe)  # before: "does not exist"; opened, it would block (nothing writes to it)
    assert info.value.kind == "not_regular_file" and str(fifo) in str(info.value)


def test_a_deeply_nested_llamafactory_file_is_a_located_error(tmp_path):
    bombs.write_ok_image(tmp_path)
    good = {"messages": [{"role": "user", "content": "<image>Lesion?"}, {"role": "assistant", "content": "No."}],
            "images": ["ok.png"]}
    path = tmp_path / "lf.json"
    path.write_text("[" + json.dumps(good) + ", " + bombs.deep_line(200_000) + "]")
    res, _, _ = run_check(str(path))
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode == 1, out[-3000:]
    assert "too_deep" in res.stdout and str(path) in res.stdout, out[-3000:]


def test_a_bomb_embedded_in_a_parquet_row_is_a_located_row_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = bombs.png(tmp_path / "deep16.png", 13000, 13000, bit_depth=16).read_bytes()
    ok = tmp_path / "ok.png"
    bombs.write_ok_image(tmp_path)
    table = pa.table({"image": [{"bytes": ok.read_bytes(), "path": None}, {"bytes": big, "path": None}],
                      "question": ["Lesion?", "Lesion?"], "answer": ["no", "yes"]})
    pq.write_table(table, tmp_path / "vqa.parquet")
    res, _, _ = run_check(str(tmp_path / "vqa.parquet"), timeout=120)
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode == 1, out[-3000:]
    assert "row 2" in res.stdout and "data.max_image_pixels" in res.stdout, out[-3000:]
    assert "2 samples, 1 ok, 1 errors" in res.stdout, out[-3000:]


# --- through a recipe's model: token counting, encoding and the family's own media reads ----------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["line_50mb", "text_2m_chars", "wav_rate_2g", "flac_header_claims_10h",
                                  "flac_unknown_length_4000s", "rle_dicom_20000", "mp4_110k_frames"])
def test_bombs_through_a_recipe_are_located_errors(bomb_set, name):
    _, files = bomb_set
    path, kind, word, args = files[name]
    res, seconds, _ = run_check("--recipe", "medical-tiny", *args, str(path), timeout=120)
    _assert_located(res, path, 2, kind, word)
    assert "3 samples, 2 ok, 1 errors" in res.stdout, res.stdout[-2000:]


@pytest.mark.slow
def test_the_caps_are_recipe_settings_named_in_the_error(tmp_path):
    bombs.write_ok_image(tmp_path)  # 48 x 48
    bombs.flac_silence(tmp_path / "five.flac", 5)
    bombs.mp4(tmp_path / "clip.mp4", 40, size=16, fps=10)
    data = bombs.write_dataset(tmp_path / "d.jsonl", [_sample("audio", "five.flac"), _sample("video", "clip.mp4"),
                                                      bombs.long_line(3000), bombs.long_line(600)])
    res, _, _ = run_check("--recipe", "medical-tiny", str(data))
    assert "6 samples, 5 ok, 1 errors" in res.stdout, res.stdout + res.stderr  # line 4: too many tokens only
    res, _, _ = run_check("--recipe", "medical-tiny", "data.max_image_pixels=1000", "data.max_audio_seconds=3",
                          "data.max_video_frames=20", "data.max_line_bytes=2048", "data.max_text_chars=100",
                          str(data))
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "6 samples, 0 ok, 6 errors" in res.stdout, out
    got = {int(x.split(":")[1]): x for x in res.stdout.splitlines() if x.startswith(f"{data}:")}
    assert "data.max_image_pixels=1,000" in got[1] and "data.max_image_pixels=1,000" in got[6]
    assert "data.max_audio_seconds=3" in got[2]
    assert "data.max_video_frames=20" in got[3]
    assert "data.max_line_bytes=2,048" in got[4]
    assert "data.max_text_chars=100" in got[5]


def test_caps_have_bounds_in_the_recipe():
    from finetune.recipe import RecipeError, load_recipe

    for key, bad in [("data.max_image_pixels", 0), ("data.max_audio_seconds", 0), ("data.max_video_frames", 0),
                     ("data.max_video_seconds", -1), ("data.max_line_bytes", 10), ("data.max_text_chars", 0),
                     ("data.max_volume_voxels", 0)]:
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe("medical-tiny", [f"{key}={bad}"])


def test_lowered_caps_check_again_what_a_run_remembered(tmp_path, small_demo, tiny_qwen):
    """A sample remembered as checked under one recipe's caps is checked again under lower ones, before
    step 1 (else the collator would meet the refusal mid-training)."""
    from finetune.data.prepare import prepare
    from finetune.data.schema import Limits, current_limits, load_samples, set_limits

    fam, loaded = tiny_qwen
    samples, _ = load_samples(small_demo["train"])
    config = fam.read_config(loaded.base_path)
    record = tmp_path / "record.json"
    with_images = sum(any(p.type == "image" for p in s.media()) for s in samples)
    assert with_images
    before = current_limits()
    try:
        good, _, errors = prepare(samples, fam, loaded.processor, config, None, max_tokens=512, record=record)
        assert not errors and len(good) == len(samples)
        set_limits(Limits(max_image_pixels=100))
        stats = {}
        good, _, errors = prepare(samples, fam, loaded.processor, config, None, max_tokens=512, record=record,
                                  stats=stats)
    finally:
        set_limits(before)
    assert stats["remembered"] == 0
    assert len(errors) == with_images and {e.kind for e in errors} == {"too_large"}
    assert all("data.max_image_pixels=100" in str(e) for e in errors)
