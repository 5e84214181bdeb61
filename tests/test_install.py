"""Two commands on a fresh clone: every make target that runs the toolkit sets the environment up
on first use, from a stamp tied to the lock (`make finetune`, then `make test`); `make install`
always installs and refreshes the stamp; `make gpu-check` never installs (GPU machines have no
network)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

TOOLKIT_TARGETS = ["finetune", "train", "eval", "export", "check", "demo", "recipes", "test", "bench-packing"]
INSTALL = '-m pip install -q -c requirements/lock.txt -e ".[dev,medical,deepspeed,video]"'


def _stamp_name(lock: Path = ROOT / "requirements" / "lock.txt") -> str:
    digest = hashlib.sha256(lock.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f".installed-{digest[:16]}"


def _make(*args: str, dry: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *(["-n"] if dry else []), "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("target", TOOLKIT_TARGETS)
def test_every_toolkit_target_installs_on_first_use_and_not_once_stamped(tmp_path, target):
    venv = tmp_path / "venv"
    first = _make(target, f"VENV={venv}")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert INSTALL in out and f"touch {venv}/{_stamp_name()}" in out, out
    last = out.strip().splitlines()[-1]  # the target's own command comes after the set-up
    assert str(venv) in last and "pip" not in last and out.index(INSTALL) < out.rindex(last), out
    venv.mkdir()
    (venv / _stamp_name()).touch()
    again = _make(target, f"VENV={venv}")
    assert "pip install" not in again.stdout and "lock.py" not in again.stdout, again.stdout


def test_the_stamp_is_tied_to_the_lock_and_make_install_refreshes_it(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / _stamp_name()).touch()
    lock = tmp_path / "lock.txt"
    lock.write_text((ROOT / "requirements" / "lock.txt").read_text() + "example-package==1.0\n")
    changed = _make("finetune", f"VENV={venv}", f"LOCK={lock}").stdout
    assert "pip install" in changed and f"touch {venv}/{_stamp_name(lock)}" in changed, changed
    refresh = _make("install", f"VENV={venv}").stdout  # installs although the stamp is there
    assert INSTALL in refresh and f"rm -f {venv}/.installed-*; touch {venv}/{_stamp_name()}" in refresh, refresh


def test_gpu_check_never_installs():
    out = _make("gpu-check", "VENV=/nonexistent/venv").stdout
    assert "pip install -q -c" not in out and ".installed-" not in out and "bench/gpu_check.py" in out, out


@pytest.mark.slow
def test_an_environment_that_holds_the_lock_is_stamped_without_pip(tmp_path):
    """A real run (not -n): a .venv already at the locked versions (this one, behind a wrapper) is
    checked and stamped, and the target runs; a changed lock is checked again and re-stamped, the
    old stamp removed. (The install itself needs the network; the -n tests above cover it.)"""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    res = _make("recipes", f"VENV={venv}", dry=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "holds the locked versions" in res.stdout and "medical-tiny" in res.stdout, res.stdout
    assert sorted(p.name for p in venv.glob(".installed-*")) == [_stamp_name()]
    res = _make("recipes", f"VENV={venv}", dry=False)
    assert res.returncode == 0 and "holds the locked versions" not in res.stdout, res.stdout
    lock = tmp_path / "lock.txt"
    lock.write_text((ROOT / "requirements" / "lock.txt").read_text() + "# a comment changes the hash\n")
    res = _make("recipes", f"VENV={venv}", f"LOCK={lock}", dry=False)
    assert res.returncode == 0 and "holds the locked versions" in res.stdout, res.stdout + res.stderr
    assert sorted(p.name for p in venv.glob(".installed-*")) == [_stamp_name(lock)]


def test_pyav_is_installed_by_make_install_and_takes_no_cuda_wheel():
    """`make install` includes the `video` extra (PyAV) at the locked version; PyAV requires
    nothing (its wheel bundles FFmpeg's CPU libraries), so no CUDA wheel comes with it."""
    import tomllib
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [r.split(">")[0] for r in project["optional-dependencies"]["video"]] == ["av"]
    lock = dict(line.split("==") for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert metadata.version("av") == lock["av"]
    assert not [r for r in metadata.distribution("av").requires or [] if "extra ==" not in r]
    files = [str(f) for f in metadata.distribution("av").files or []]
    assert files and not [f for f in files if "cuda" in f.lower() or "nvidia" in f.lower()], files


def test_gradio_is_installed_without_its_pillow_cap_and_with_everything_else_it_requires():
    """`make install` installs gradio with --no-deps (gradio 6.31 caps pillow below 13; the lock
    keeps pillow 13) and SERVE_DEPS: gradio's other requirements, so none is missing or stray."""
    import re
    import shlex
    from importlib import metadata

    from packaging.requirements import Requirement

    lock = dict(line.split("==") for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert metadata.version("gradio") == lock["gradio"] and metadata.version("pillow") == lock["pillow"]
    assert int(lock["pillow"].split(".")[0]) >= 13
    steps = _make("install", "STAMP=").stdout
    assert re.search(r'pip install -q --no-deps -c requirements/lock.txt "gradio>=6,<7"', steps), steps
    [deps_line] = [line for line in steps.splitlines() if '"fastapi' in line]
    listed = {Requirement(r).name.lower() for r in shlex.split(deps_line.split("requirements/lock.txt", 1)[1])}
    needed = {Requirement(r).name.lower() for r in metadata.requires("gradio") or [] if "extra ==" not in r}
    assert listed == needed - {"pillow"}, (listed ^ (needed - {"pillow"}))
