"""`make gpu-check`: the project's GPU checks in one command that ends within ~8 minutes on one
H100/H200 started bare (no network; the wheels it lacks carried in .whl/, see tools/gpu_wheels.sh).

    make gpu-check                        # on a machine with a CUDA GPU -> bench/results/<date>-<gpu>.md
    make gpu-check DRY=1                  # every part on the CPU with tiny shapes (tests the driver; in make test)
    make gpu-check ARGS="--only finetune,steps"      # some parts (keys below)

On a lent GPU machine: `bash tools/gpu_wheels.sh` here first, then run `make gpu-check` there with
.whl carried and a limit of about 540 s (the budget below is 450 s, plus the clean-up and copy-back).

The parts run in priority order under ONE deadline (--budget seconds from the Makefile's start, so
the wheels' install counts): each gets the time that is left, up to its own cap, and one with less
left than its minimum is recorded as skipped:

  0. env       the versions in use, and every requirement of the carried wheels met on this machine;
  1. finetune  `python -m finetune run medical-tiny train.precision=bf16` on one GPU (train, eval and
               export into a temporary output.dir; train.epochs=6 = 408 steps, about 2 minutes);
  2. tests     the GPU-marked tests (`pytest -m gpu tests`);
  3. steps     bench/gpu_step.py: one row per family of the real (7B-class) shapes, LoRA bf16, packed
               rows of 4096 tokens: tokens/s, MFU, measured and planned peak memory;
  4. qlora     bench/gpu_step.py: Qwen2.5-Omni-7B QLoRA, the measured peak against the planner's (the
               `planned GB` column is finetune.plan.plan, what `python -m finetune plan medical-qlora`
               prints for the same shape);
  5. zero3     one DeepSpeed ZeRO-3 training step of medical-tiny (torchrun, one process);
  6. packing   bench/packing.py: packed vs padded throughput (the packing table);
  7. vllm      bench/gpu_vllm.py: vLLM serves the merged tiny Qwen2.5-Omni and Qwen3-Omni exports with
               our greedy answers (reports "skipped" at once where vLLM is not installed, as on the
               lent machines: its wheel is over the 64 MiB that can be carried).

MFU, as bench/gpu_step.py's step_flops defines it: the LLM's 6N FLOPs per token with gradient
checkpointing (2N forward, 2N backward for the inputs' gradients under LoRA, 2N recompute), plus the
media towers' forward (2 x their parameters per position), over the GPU's dense bf16 peak
(--peak-tflops; H100/H200 SXM: 989). Attention products are not counted.

Each part's output is printed as it comes; its table rows and result lines are saved into the
results file as soon as they appear, and the file is rewritten (and copied to $OUT when that is set)
after every part, so a run stopped at any point keeps what finished. Each part runs in its own
process group; on a timeout, or SIGTERM/SIGINT of this driver, the group and every process it
started (torchrun's workers start their own sessions) are killed, and the temporary folder the
parts write into (TMPDIR: random checkpoints, run folders) is removed. Exit status: 0 when no part
failed or ran out of time (skipped parts do not count), 1 otherwise, 128+N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
#: what tools/gpu_wheels.sh carries, and what the GPU machines hold already
CARRIED_LIST = ROOT / "tools" / "gpu_wheels.txt"
MACHINE_LIST = ROOT / "tools" / "gpu_machine_packages.txt"
#: the extras of this package that gpu-check needs beside its core requirements
GPU_EXTRAS = ("deepspeed", "dev")
#: PEP 508 marker values of the GPU machines' Python (CPython 3.12 on linux x86_64)
GPU_MARKERS = {"implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
               "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
               "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
               "python_version": "3.12", "sys_platform": "linux"}
CLEANUP_S = 10.0  # kept back from the deadline for stopping a part and writing the results
GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


# ----------------------------------------------------------------------------------------------
# The carried wheels: every requirement met by what is carried or what the GPU machine holds


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> dict[str, str | None]:
    """`name` or `name==version` per line (comments after #) -> {canonical name: version or None};
    a word after the name (tools/gpu_wheels.txt's `build`) is ignored here."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.split()[0].partition("==")
            out[canonical(name)] = version or None
    return out


def locked_versions(path: Path = LOCK) -> dict[str, str]:
    """The lock's pins (requirements/lock.txt)."""
    return {n: v for n, v in read_names(path).items() if v}


def own_requirements(extras: tuple[str, ...] = GPU_EXTRAS) -> list[str]:
    """This package's requirements as the GPU machine needs them: pyproject.toml's dependencies
    and those of `extras` (the package itself runs from the source tree, it is not installed)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]


def requirement_gaps(requirers: dict[str, list[str]], available: dict[str, tuple[str, str | None]],
                     markers: dict[str, str] | None = GPU_MARKERS) -> tuple[list[str], list[str]]:
    """Check every requirement of `requirers` ({who: [Requires-Dist strings]}) against `available`
    ({canonical name: (where, version or None when unknown)}). Markers are evaluated for `markers`
    (None: this interpreter); requirements that apply only under an extra are skipped, and a
    requirement's own extras are ignored. Returns (gaps, unverified): gaps are requirements that
    nothing available meets (absent, or at a version outside the specifier); unverified ones name
    a package present at an unknown version under a version specifier."""
    from packaging.requirements import Requirement

    gaps, unverified = [], []
    for who, reqs in sorted(requirers.items()):
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**(markers or {}), "extra": ""}):
                continue
            name = canonical(req.name)
            if name not in available:
                gaps.append(f"{who} requires {text}: neither carried nor on the GPU machine")
                continue
            where, version = available[name]
            if not req.specifier:
                continue
            if version is None:
                unverified.append(f"{who} requires {text}: {where} at an unknown version")
            elif not req.specifier.contains(version, prereleases=True):
                gaps.append(f"{who} requires {text}: {where} has {version}")
    return gaps, unverified


# ----------------------------------------------------------------------------------------------
# Processes: each part in its own process group, everything it started killed when it ends


def _proc_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, parent pid, process group, start time) of every process (Linux /proc)."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (rest[0], int(rest[1]), int(rest[2]), int(rest[19]))
    return out


def _descendants(table, roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


_SUBREAPER = False


def become_subreaper() -> None:
    """Processes orphaned inside a part (a torchrun worker whose agent died) are re-parented to this
    driver instead of init, so they are still found and killed (Linux; elsewhere a no-op)."""
    global _SUBREAPER
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _SUBREAPER = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        _SUBREAPER = False


class Group:
    """A part's process (leader of its own process group) and every process seen below it."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)
        self.seen: dict[int, int] = {}  # pid -> start time (a pid reused by another process is not ours)
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.track()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def track(self) -> None:
        """Note every process below the leader (and, as subreaper, every orphan re-parented here)."""
        table = _proc_table()
        roots = {self.proc.pid} | ({os.getpid()} if _SUBREAPER else set())
        for pid in _descendants(table, roots) | {self.proc.pid}:
            if pid in table and pid != os.getpid():
                self.seen.setdefault(pid, table[pid][3])

    def alive(self) -> list[int]:
        """Tracked processes still running (not zombies)."""
        table = _proc_table()
        return [p for p, start in self.seen.items()
                if p in table and table[p][3] == start and table[p][0] not in ("Z", "X")]

    def _signal(self, sig: int) -> None:
        table, own = _proc_table(), os.getpgrp()
        groups = {self.proc.pid} | {table[p][2] for p in self.alive() if p in table}
        for g in groups - {own}:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.alive():  # one that left its group for one of ours, say
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace: float = GRACE_S) -> None:
        """SIGTERM to the group and every tracked process, SIGKILL after `grace`; reaped."""
        self.track()
        if self.proc.poll() is None or self.alive():
            self._signal(signal.SIGTERM)
            end = time.monotonic() + grace
            while (self.proc.poll() is None or self.alive()) and time.monotonic() < end:
                time.sleep(0.1)
            if self.proc.poll() is None or self.alive():
                self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 5
        while self.alive() and time.monotonic() < end:
            time.sleep(0.05)
        if _SUBREAPER:  # orphans re-parented here are ours to reap
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
        self.reader.join(timeout=2)


class Stopped(Exception):
    """The driver was sent SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# The parts


@dataclass
class Part:
    """One check: its command, how long it may take, which of its lines go into the results."""

    key: str
    title: str
    min_s: float  # skipped when less than this is left
    cap_s: float  # never longer than this, even with time left
    command: Callable[["Run", Path], list[str]]
    keep: re.Pattern
    status: str = "pending"
    seconds: float | None = None
    cpu: float | None = None  # CPU seconds of its processes (user + system)
    shown: str = ""  # the command as written into the results
    saved: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


_ROW = r"^[a-z0-9_]+ +(lora|qlora) "  # a bench/gpu_step.py row (measured or FAILED)


def make_parts(dry: bool, peak: float) -> list[Part]:
    """The parts in priority order; `dry`: tiny shapes on the CPU, a few steps each."""
    step_args = (["--tiny", "--device", "cpu", "--max-tokens", "700", "--steps", "1"] if dry
                 else ["--max-tokens", "4096", "--steps", "2"])

    def env_cmd(run, tmp):
        return [run.py, "bench/gpu_check.py", "--env-report"]

    def finetune(run, tmp):
        # 6 epochs of the 68-row demo = 408 steps: the H100 ran 1700 steps in 172 s before the speed
        # work, so about a minute of training beside the checks before step 1, eval and export
        short = (["train.max_steps=3", "eval.max_samples=8", "eval.bootstrap=0"] if dry else ["train.epochs=6"])
        return [run.py, "-m", "finetune", "run", "medical-tiny", "train.precision=bf16", *short,
                f"output.dir={tmp / 'run'}"]

    def tests(run, tmp):
        return [run.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]

    def steps(run, tmp):
        return [run.py, "bench/gpu_step.py", "--mode", "lora", *step_args, f"--peak-tflops={peak}"]

    def qlora(run, tmp):
        return [run.py, "bench/gpu_step.py", "--family", "qwen2_5_omni", "--mode", "qlora", *step_args,
                f"--peak-tflops={peak}"]

    def zero3(run, tmp):
        return [run.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "finetune",
                "train", "medical-tiny", "train.max_steps=1", "train.distributed=deepspeed", "train.deepspeed=zero3",
                f"output.dir={tmp / 'run'}"]

    def packing(run, tmp):
        return [run.py, "bench/packing.py",
                *(["--repeats", "1", "--max-tokens", "512", "--samples", "12"] if dry else
                  ["--size", "small", "--repeats", "3"])]

    def vllm(run, tmp):
        return [run.py, "bench/gpu_vllm.py", *(["--smoke"] if dry else [])]

    # the DRY walk's times are not a GPU's: small minimums, and no cap but the deadline (a loaded
    # CPU, or DeepSpeed's first build of its CPU op, can take minutes)
    d = 0.1 if dry else 1.0
    parts = [
        Part("env", "environment: versions, the carried wheels' requirements", 5 * d, 60, env_cmd,
             re.compile(r"^(python|torch|gpu|requirements|  |[a-z0-9-]+ +\d)")),
        Part("finetune", "finetune medical-tiny, bf16, one GPU: train, eval, export", 60 * d, 240, finetune,
             re.compile(r"^(model |packing:|checked |trained |done in|  (eval|merged|adapter) |before training|"
                        r"[A-Za-z]*Error)")),
        Part("tests", "GPU-marked tests (pytest -m gpu)", 30 * d, 180, tests,
             re.compile(r"^(FAILED|ERROR|\d+ (passed|failed|skipped|error)|=+ .*(passed|failed|error))")),
        Part("steps", "7B-shape training step per family, LoRA bf16, 4096 tokens (gpu_step)", 60 * d, 330, steps,
             re.compile(rf"^(gpu_step:|family |{_ROW[1:]})")),
        Part("qlora", "Qwen2.5-Omni-7B QLoRA: measured peak vs plan (gpu_step)", 45 * d, 180, qlora,
             re.compile(rf"^(gpu_step:|family |{_ROW[1:]})")),
        Part("zero3", "DeepSpeed ZeRO-3, one training step (torchrun, one process)", 30 * d, 150, zero3,
             re.compile(r"^(distributed:|model |trained |[A-Za-z]*Error)")),
        Part("packing", "packing table (bench/packing.py)", 40 * d, 180, packing,
             re.compile(r"^(packing benchmark:|mixture |demo |long-tail )")),
        Part("vllm", "vLLM serves the merged exports with our greedy answers (gpu_vllm)", 10 * d, 300, vllm,
             re.compile(r"^\| ")),
    ]
    if dry:
        for p in parts:
            p.cap_s = float("inf")
    return parts


class Run:
    """The state of one gpu-check: parts, deadline, results file, temporary folder."""

    def __init__(self, args, parts: list[Part], on_write: Callable[[Path], None] | None = None, gpu: str = ""):
        self.args, self.parts, self.on_write = args, parts, on_write
        self.py = args.python or sys.executable
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
        self.deadline = self.t0 + args.budget
        self.gpu = "cpu (DRY walk)" if args.dry else gpu
        self.date = datetime.date.today().isoformat()
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower().replace("nvidia", "")).strip("-")
        self.out = args.out or ROOT / "bench" / "results" / f"{self.date}-{'dry' if args.dry else slug}.md"
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.tmp))
        self.group: Group | None = None
        self.stopped: str | None = None
        self.defer, self.pending = False, 0

    def left(self) -> float:
        return self.deadline - time.time()

    # -- the results file

    def render(self) -> str:
        a = self.args
        head = [f"# GPU check, {self.date}, {self.gpu}", "",
                f"`make gpu-check{' DRY=1' if a.dry else ''}` (bench/gpu_check.py): the parts in priority order "
                f"under one deadline, {a.budget:.0f} s from the start (the carried wheels' install counted); each "
                "part gets what is left up to its cap, and one with less left than its minimum is skipped. MFU as "
                "bench/gpu_step.py's step_flops defines it (6N per LLM token with checkpointing, plus the towers' "
                f"forward) over {a.peak_tflops:.0f} TFLOP/s dense bf16."
                + (" DRY: tiny shapes on the CPU, a few steps each; no figure here is a GPU's." if a.dry else ""),
                ""]
        if self.stopped:
            head += [f"**Stopped by {self.stopped}**; the parts below are what finished before.", ""]
        table = ["| part | status | seconds | CPU seconds |", "|---|---|---|---|"]
        for i, p in enumerate(self.parts):
            table.append(f"| {i}. {p.key}: {p.title} | {p.status} | "
                         f"{'' if p.seconds is None else f'{p.seconds:.0f}'} | "
                         f"{'' if p.cpu is None else f'{p.cpu:.0f}'} |")
        body = []
        for i, p in enumerate(self.parts):
            if p.status == "pending":
                continue
            body += ["", f"## {i}. {p.key}: {p.title} ({p.status}"
                     + ("" if p.seconds is None else f", {p.seconds:.0f} s") + ")", ""]
            if p.shown:
                body += [f"`{p.shown}`", ""]
            lines = p.saved + ([] if p.status in ("ok", "running") or not p.tail else
                               ["", "(the last lines of its output)", *p.tail])
            if lines:
                body += ["```", *lines, "```"]
        return "\n".join(head + table + body) + "\n"

    def write(self, after: Part | None = None) -> None:
        """Rewrite the results file (atomically) and copy it to $OUT; log its size after a part."""
        text = self.render()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.out)
        dest = os.environ.get("OUT")
        if dest and Path(dest).is_dir():
            part = Path(dest) / f".{self.out.name}.tmp"
            shutil.copyfile(self.out, part)
            os.replace(part, Path(dest) / self.out.name)
        if after is not None:
            print(f"gpu-check: results {self.out}: {len(text.encode())} bytes after part {after.key} "
                  f"({after.status})", flush=True)
            if self.on_write:
                self.on_write(self.out)

    # -- running the parts

    def child_env(self, tmp: Path) -> dict[str, str]:
        # TMPDIR: what a part writes (random checkpoints, pytest's folders) goes where it is removed;
        # compiled kernels are kept for the next parts (inductor's cache would be under TMPDIR)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", TORCHINDUCTOR_CACHE_DIR=str(self.tmp / "inductor"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if self.args.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # tiny shapes on the CPU even where a GPU is
        return env

    def run_part(self, part: Part) -> None:
        left = self.left() - CLEANUP_S
        if left < part.min_s:
            part.status = f"skipped: {max(0, left):.0f} s left, needs at least {part.min_s:.0f}"
            print(f"== {part.key}: {part.status}", flush=True)
            return
        limit = min(part.cap_s, left)
        tmp = self.tmp / part.key
        tmp.mkdir()
        stand_in = self.args.stand_in.get(part.key)
        cmd = ["bash", "-c", stand_in] if stand_in is not None else part.command(self, tmp)
        part.shown = " ".join(shlex.quote(str(c).replace(str(self.tmp), "$TMP")).replace(self.py, "python")
                              for c in cmd)
        part.status = "running"
        self.write()
        print(f"== {part.key}: {part.title} (at most {limit:.0f} s)\n   {part.shown}", flush=True)
        t0, started, cpu0 = time.monotonic(), time.time(), _children_cpu()
        tail: list[str] = []
        timed_out = False
        # a signal between starting the part and noting it would leave the part running: it is acted
        # on once the part is noted (a blocked signal mask would be inherited by the part)
        self.defer, error = True, None
        try:
            self.group = g = Group(cmd, self.child_env(tmp))
        except OSError as e:
            error = e
        finally:
            self.defer = False
        if self.pending:
            self.on_signal(self.pending, None)
        if error is not None:
            part.status = f"FAILED (did not start: {error})"
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            end, last_track, exited_at = t0 + limit, 0.0, None
            while True:
                try:
                    line = g.lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    print(line, flush=True)
                    tail = (tail + [line])[-20:]
                    if part.keep.search(line):
                        part.saved.append(line.replace(str(self.tmp), "$TMP"))
                        self.write()  # a row is saved as soon as it is printed
                now = time.monotonic()
                if now > end:
                    timed_out = True
                    break
                if now - last_track > 0.5:
                    g.track()
                    last_track = now
                if g.proc.poll() is not None:
                    # the leader is gone; a process still holding its output is waited for briefly
                    exited_at = exited_at or now
                    if now - exited_at > GRACE_S:
                        break
        finally:
            g.stop(grace=2.0 if self.args.dry else GRACE_S)
            self.group = None
            shutil.rmtree(tmp, ignore_errors=True)
            part.seconds, part.cpu = time.monotonic() - t0, _children_cpu() - cpu0
            part.tail = [x.replace(str(self.tmp), "$TMP") for x in tail[-15:]]
            if timed_out or self.stopped:
                part.saved += stale_build_locks(since=started)
        rc = g.proc.returncode
        if timed_out:
            part.status = f"TIMEOUT after {limit:.0f} s"
        else:
            part.status = "ok" if rc == 0 else f"FAILED (exit {rc})"

    def on_signal(self, signum, frame) -> None:
        """SIGTERM/SIGINT: stop the running part's processes and remove the temporary folder now,
        then unwind (the rest of the clean-up runs in the `finally` blocks)."""
        if self.defer:
            self.pending = signum
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # the clean-up is not interrupted again
        self.stopped = signal.Signals(signum).name
        if self.group is not None:
            self.group.stop(grace=2.0)
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise Stopped(signum)

    def main(self) -> int:
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        print(f"gpu-check: {self.gpu}; {self.left():.0f} s left for {len(self.parts)} parts; results in {self.out}; "
              f"temporary folder {self.tmp}", flush=True)
        if os.environ.get("GPU_CHECK_WROTE"):  # the Makefile copies this file to $OUT whatever happens
            Path(os.environ["GPU_CHECK_WROTE"]).write_text(str(self.out))
        try:
            self.write()
            for part in self.parts:
                self.run_part(part)
                self.write(after=part)
        except Stopped as e:
            status = 128 + e.signum
            for p in self.parts:
                if p.status == "running":
                    p.status = f"stopped by {self.stopped}"
                elif p.status == "pending":
                    p.status = "not run (stopped)"
        finally:
            if self.group is not None:
                self.group.stop(grace=2.0)
            shutil.rmtree(self.tmp, ignore_errors=True)
            try:
                self.write()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        if status == 0 and any(p.status.startswith(("FAILED", "TIMEOUT")) for p in self.parts):
            status = 1
        print("\n" + self.out.read_text(), flush=True)
        ok = sum(p.status == "ok" for p in self.parts)
        print(f"gpu-check: {ok} of {len(self.parts)} parts ok, exit {status}; results in {self.out}", flush=True)
        return status


def _children_cpu() -> float:
    """CPU seconds of every finished process below this one (what a part's processes used)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def stale_build_locks(since: float) -> list[str]:
    """torch's extension builds (DeepSpeed's CPU op) hold a `lock` file while they run: one made
    since a part started that was then killed is named, since every later build waits on it (it is
    not removed here: another process may be building)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    out = []
    for lock in root.glob("*/*/lock") if root.is_dir() else []:
        try:
            if lock.stat().st_mtime >= since - 1:
                out.append(f"a stopped build left {lock}: later builds wait on it; remove it if no build is running")
        except OSError:
            pass
    return out


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi (this driver never initialises CUDA: the parts need
    the memory), else torch in a subprocess."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() if "
                               "torch.cuda.is_available() else '')"], capture_output=True, text=True,
                              timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env_report() -> int:
    """Part 0 on the machine itself: versions and where they come from (carried or the image), and
    every requirement of the carried distributions and of this package against what is installed
    here (importlib.metadata, with the carried wheels first on the path)."""
    from importlib import metadata

    import torch

    print(f"python {sys.version.split()[0]} ({sys.executable})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    carried = read_names(CARRIED_LIST)
    have = {}
    for d in metadata.distributions():
        if d.metadata["Name"]:
            have.setdefault(canonical(d.metadata["Name"]), (str(d.locate_file("")), d.version))
    shown = ["transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed", "tokenizers",
             "huggingface-hub", "safetensors"]
    for name in dict.fromkeys([*shown, *sorted(carried)]):
        if name in have:
            where, version = have[name]
            print(f"{name:<16} {version:<12} {'carried' if name in carried else 'image'} ({where})")
    requirers = {"omni-finetune": own_requirements()}
    for name in carried:
        try:
            requirers[name] = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            requirers[name] = []
            print(f"  {name}: carried but not installed")
    available = {n: ("installed", v) for n, (_, v) in have.items()}
    gaps, _ = requirement_gaps(requirers, available, markers=None)
    print(f"requirements: {'all met' if not gaps else f'{len(gaps)} not met'} "
          f"({sum(len(r) for r in requirers.values())} checked, this interpreter's markers)")
    for g in gaps:
        print(f"  {g}")
    return 1 if gaps else 0


def main(argv=None, on_write: Callable[[Path], None] | None = None) -> int:
    """Run the parts (see the module docstring); `on_write` is called with the results file after
    each part (tests read it there)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="every part on the CPU, tiny shapes, a few steps (tests the driver)")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for everything, from $GPU_CHECK_T0 (the Makefile's start) or this driver's start")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default bench/results/<date>-<gpu>.md)")
    ap.add_argument("--only", default="", help="comma-separated part keys to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated part keys not to run")
    ap.add_argument("--python", default=None, help="interpreter of the parts (default: this one)")
    ap.add_argument("--tmp", default=None, help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--stand-in", action="append", default=[], metavar="KEY=COMMAND",
                    help="run this shell command instead of part KEY (tests the driver's failure paths)")
    ap.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_report:
        return env_report()
    stand_in = {}
    for s in args.stand_in:
        key, _, cmd = s.partition("=")
        stand_in[key] = cmd
    args.stand_in = stand_in
    parts = make_parts(args.dry, args.peak_tflops)
    keys = [p.key for p in parts]
    only = [k for k in args.only.split(",") if k] or keys
    skip = [k for k in args.skip.split(",") if k]
    for k in [*only, *skip, *stand_in]:
        if k not in keys:
            ap.error(f"unknown part {k!r}; the parts are {', '.join(keys)}")
    parts = [p for p in parts if p.key in only and p.key not in skip]
    gpu = "" if args.dry else gpu_name()
    if not args.dry and not gpu:
        print("gpu-check needs a CUDA GPU (`make gpu-check DRY=1` walks every part on the CPU)", file=sys.stderr)
        return 2
    return Run(args, parts, on_write, gpu).main()


if __name__ == "__main__":
    become_subreaper()
    sys.exit(main())
