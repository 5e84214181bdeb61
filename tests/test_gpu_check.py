"""`make gpu-check` without a GPU: the carried wheels are complete, and the driver keeps what
finished, kills what it started and removes what it wrote, whatever stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
try:
    import gpu_check as G
finally:
    sys.path.pop(0)

WHEELS = ROOT / ".whl"


def _wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist) read from a wheel's METADATA."""
    from email.parser import Parser

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = Parser().parsestr(z.read(meta).decode())
    return G.canonical(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def _available(carried: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    avail = {n: ("the GPU machine", v) for n, v in G.read_names(G.MACHINE_LIST).items()}
    avail.update({n: ("carried", v) for n, v in carried.items()})  # a carried one is first on the path
    return avail


def test_every_requirement_of_the_carried_wheels_is_met_on_the_gpu_machine():
    """Every Requires-Dist (markers for CPython 3.12 on linux x86_64, extras ignored) of every
    carried distribution, and this package's own requirements, is met by a carried distribution
    or one the GPU machine holds at a version that satisfies it. The requirements are read from
    this environment's metadata (it holds the locked versions, which are the carried ones)."""
    carried = G.read_names(G.CARRIED_LIST)
    lock = G.locked_versions()
    assert not [n for n in carried if n not in lock], "every carried name is pinned in requirements/lock.txt"
    requirers = {"omni-finetune (pyproject.toml)": G.own_requirements()}
    for name in carried:
        dist = metadata.distribution(name)
        assert dist.version == lock[name], f"{name}: the environment has {dist.version}, the lock {lock[name]}"
        requirers[name] = dist.requires or []
    gaps, unverified = G.requirement_gaps(requirers, _available({n: lock[n] for n in carried}))
    print("present on the GPU machine at a version not recorded:\n  " + "\n  ".join(unverified))
    assert gaps == [], "\n".join(gaps)


def test_a_missing_or_too_old_requirement_is_a_gap():
    """The check itself: an absent name, a known version outside the specifier, a marker for
    another platform and an extra's requirement."""
    avail = {"numpy": ("the GPU machine", "2.5.2"), "typing-extensions": ("the GPU machine", None)}
    gaps, unverified = G.requirement_gaps({"x": ["numpy>=3", "cffi>=1.0", "typing_extensions>=4.14",
                                                 "pywin32; sys_platform == 'win32'", "pytest; extra == 'test'",
                                                 "tomli; python_version < '3.11'"]}, avail)
    assert gaps == ["x requires numpy>=3: the GPU machine has 2.5.2",
                    "x requires cffi>=1.0: neither carried nor on the GPU machine"]
    assert unverified == ["x requires typing_extensions>=4.14: the GPU machine at an unknown version"]


def test_tokenizers_of_the_gpu_machine_meets_the_locked_transformers():
    """The GPU machine has tokenizers 0.23.2 where the lock says 0.23.3: it is not carried, so the
    locked transformers must accept 0.23.2."""
    machine = G.read_names(G.MACHINE_LIST)
    assert machine["tokenizers"] == "0.23.2" and "tokenizers" not in G.read_names(G.CARRIED_LIST)
    gaps, _ = G.requirement_gaps({"transformers": metadata.distribution("transformers").requires},
                                 {"tokenizers": ("the GPU machine", "0.23.2")})
    assert not [g for g in gaps if "tokenizers" in g], gaps


@pytest.mark.skipif(not WHEELS.is_dir(), reason="no .whl/ here (bash tools/gpu_wheels.sh makes it)")
def test_the_carried_wheels_are_the_list_at_the_locked_versions_complete_and_small():
    """.whl/ (when made here): one wheel per carried name at the lock's version, for CPython 3.12
    on linux x86_64; their own Requires-Dist met; the bundle and the working tree that travels
    with it under the device's 64 MiB."""
    from packaging.tags import Tag
    from packaging.utils import parse_wheel_filename

    lock, carried = G.locked_versions(), G.read_names(G.CARRIED_LIST)
    wheels = sorted(WHEELS.glob("*.whl"))
    found, requirers = {}, {}
    gpu_tags = {Tag(i, a, p) for i in ("cp312", "py312", "py3", "py2.py3") for a in ("cp312", "abi3", "none")
                for p in ("any", "linux_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)),
                          "manylinux2014_x86_64", "manylinux1_x86_64")}
    for w in wheels:
        name, version, requires = _wheel_metadata(w)
        _, _, _, tags = parse_wheel_filename(w.name)
        assert tags & gpu_tags, f"{w.name} does not install on CPython 3.12, linux x86_64"
        assert name not in found, f"two wheels of {name}: {found[name]} and {version}"
        found[name], requirers[name] = version, requires
    assert sorted(found) == sorted(carried), "the wheels are exactly tools/gpu_wheels.txt"
    assert {n: v for n, v in found.items() if lock[n] != v} == {}, "each at the lock's version"
    requirers["omni-finetune (pyproject.toml)"] = G.own_requirements()
    gaps, _ = G.requirement_gaps(requirers, _available(found))
    assert gaps == [], "\n".join(gaps)
    size = sum(w.stat().st_size for w in wheels)
    tree = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if tree.returncode == 0:
        size += sum((ROOT / f).stat().st_size for f in tree.stdout.decode().split("\0") if f and (ROOT / f).is_file())
    assert size < 64 * 2 ** 20, f"the wheels and the working tree are {size / 2 ** 20:.1f} MiB, the device takes 64"


# ----------------------------------------------------------------------------------------------
# The driver

PART_KEYS = ["env", "finetune", "tests", "steps", "qlora", "zero3", "packing", "vllm"]
SIZE_LINE = re.compile(r"^gpu-check: results (\S+): (\d+) bytes after part (\w+) \((.*)\)$", re.M)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_lines(path: Path, n: int, timeout: float = 120) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


# a part that starts what training starts: a worker in its own process group (DataLoader workers
# stay in the part's), one in a new session (torchrun's workers), one orphaned at once (its parent
# exits), and writes into its TMPDIR, as a random checkpoint would
SPAWN = ('sleep 300 & echo $! >> {pids}; setsid sleep 300 & echo $! >> {pids}; '
         'bash -c "setsid sleep 300 & echo \\$! >> {pids}"; '
         'head -c 1000000 /dev/zero > "$TMPDIR/checkpoint.bin"; echo "trained 1 steps in 0:01"; sleep 300')


def test_each_part_is_saved_when_it_ends_and_a_failing_one_keeps_the_status(tmp_path, capsys):
    """The results file after each part (read through the driver's hook) holds that part's section
    and rows and none of a later one's; a part that fails makes the status 1 and the later parts
    still run."""
    out = tmp_path / "r.md"
    stand_ins = {"env": "echo 'python 3.12.3'", "finetune": "echo 'trained 408 steps in 1:02'",
                 "tests": "echo '9 passed in 20.00s'", "steps": "echo 'qwen2_5_omni   lora   varlen  all  4096'",
                 "qlora": "echo 'qwen2_5_omni   qlora  varlen'; exit 3", "zero3": "echo 'trained 1 steps'",
                 "packing": "echo 'demo   400   60.4%'", "vllm": "echo '| vllm | not installed |'"}
    seen = []
    rc = G.main(["--dry", "--budget", "300", "--out", str(out), *[f"--stand-in={k}={c}" for k, c in stand_ins.items()]],
                on_write=lambda p: seen.append(p.read_text()))
    assert rc == 1
    assert len(seen) == len(PART_KEYS)
    for i, text in enumerate(seen):
        for j, key in enumerate(PART_KEYS):
            row = stand_ins[key].split("'")[1]
            assert (f"## {j}. {key}:" in text) == (j <= i), (i, key, text)
            assert (row in text) == (j <= i), (i, key, text)
    final = out.read_text()
    assert "| 4. qlora: " in final and "| FAILED (exit 3) |" in final
    assert final.count("| ok |") == len(PART_KEYS) - 1
    sizes = [int(m[1]) for m in SIZE_LINE.findall(capsys.readouterr().out)]
    assert len(sizes) == len(PART_KEYS) and sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


@pytest.mark.slow
def test_a_part_past_its_time_is_killed_with_all_it_started_and_its_files_removed(tmp_path):
    pids = tmp_path / "pids"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--budget", "22", "--only", "finetune,tests",
                          "--tmp", str(tmp), "--out", str(tmp_path / "r.md"),
                          f"--stand-in=finetune={SPAWN.format(pids=pids)}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3 and all(_dead(p) for p in started), [(p, _dead(p)) for p in started]
    assert list(tmp.iterdir()) == []  # the driver's temporary folder, the "checkpoint" in it included
    text = (tmp_path / "r.md").read_text()
    assert re.search(r"\| 0\. finetune: .* \| TIMEOUT after \d+ s \|", text), text
    assert "trained 1 steps in 0:01" in text  # what it printed before is kept
    assert re.search(r"\| 1\. tests: .* \| skipped: \d+ s left", text), text


def test_sigterm_stops_the_part_and_everything_it_started_removes_its_files_and_keeps_the_results(tmp_path):
    pids, tmp, dest = tmp_path / "pids", tmp_path / "tmp", tmp_path / "OUT"
    tmp.mkdir()
    dest.mkdir()
    proc = subprocess.Popen([sys.executable, "bench/gpu_check.py", "--dry", "--budget", "300",
                             "--only", "finetune,tests", "--tmp", str(tmp), "--out", str(tmp_path / "r.md"),
                             f"--stand-in=finetune={SPAWN.format(pids=pids)}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OUT": str(dest)})
    try:
        started = [int(p) for p in _wait_lines(pids, 3)]
        results, end = tmp_path / "r.md", time.monotonic() + 60
        # the row the part printed is in the results file (and $OUT) while the part still runs
        while time.monotonic() < end and not (results.exists() and "trained 1 steps in 0:01" in results.read_text()
                                              and (dest / "r.md").exists()):
            time.sleep(0.1)
        running = results.read_text()
        assert "| running |" in running and "trained 1 steps in 0:01" in (dest / "r.md").read_text(), running
        assert list(tmp.glob("*/*/checkpoint.bin"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert all(_dead(p) for p in started), [(p, _dead(p)) for p in started]
    assert list(tmp.iterdir()) == [], list(tmp.rglob("*"))
    text = (tmp_path / "r.md").read_text()
    assert "Stopped by SIGTERM" in text and "| stopped by SIGTERM |" in text and "| not run (stopped) |" in text, text
    assert "trained 1 steps in 0:01" in text
    assert (dest / "r.md").read_text() == text  # the copy in $OUT is the final file


@pytest.mark.slow
def test_make_gpu_check_dry_walks_every_part_on_the_cpu_and_the_file_grows_part_by_part(tmp_path):
    """`make gpu-check DRY=1`, end to end through the Makefile: every part's real command on tiny
    shapes (the GPU-marked tests replaced by a failing command), the results file written after
    each part, a failing part's status kept while the later parts run, the file copied to $OUT."""
    dest = tmp_path / "OUT"
    dest.mkdir()
    out = tmp_path / "dry.md"
    res = subprocess.run(["make", "--no-print-directory", "gpu-check", "DRY=1",
                          f"ARGS=--budget 1500 --out {out} --stand-in=tests=false"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800, env={**os.environ, "OUT": str(dest)})
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-4000:]
    writes = SIZE_LINE.findall(res.stdout)
    assert [w[2] for w in writes] == PART_KEYS, log[-4000:]
    assert {w[2]: w[3] for w in writes} == {**{k: "ok" for k in PART_KEYS}, "tests": "FAILED (exit 1)"}, log[-6000:]
    sizes = [int(w[1]) for w in writes]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    text = out.read_text()
    assert (dest / out.name).read_text() == text
    assert re.search(r"^trained 3 steps in ", text, re.M) and "  merged " in text  # train, eval, export
    for family in ("qwen2_5_omni", "baichuan_omni", "qwen3_omni_moe", "gemma4"):
        assert re.search(rf"^{family} +lora +\w+ +all +\d+", text, re.M), family
    assert re.search(r"^qwen2_5_omni +qlora +\w+ +all +\d+", text, re.M)
    assert re.search(r"^\| smoke \| \w+ wrap, \d+ probes answered", text, re.M)  # vLLM's driver, no vLLM here
    assert re.search(r"^trained 1 steps in ", text, re.M)  # ZeRO-3
    assert re.search(r"^demo +\d+ ", text, re.M) and re.search(r"^long-tail +\d+ ", text, re.M)
    assert "requirements: all met" in text
    tmp = re.search(r"temporary folder (\S+)", res.stdout)[1]
    assert not Path(tmp).exists()


def test_a_build_lock_left_by_a_stopped_part_is_named_not_removed(tmp_path, monkeypatch):
    """A torch extension build killed mid-way (DeepSpeed's CPU op) leaves its `lock`, on which every
    later build waits: the results name one made since the part started."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, new = tmp_path / "py312_cpu" / "old_op" / "lock", tmp_path / "py312_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (old, new):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    found = G.stale_build_locks(since=time.time() - 60)
    assert len(found) == 1 and str(new) in found[0]
    assert old.exists() and new.exists()
