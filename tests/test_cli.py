"""The command line: user errors as one line, bugs with their traceback, the help lists every
command, `data check` reads a recipe's own data with overrides, and the Makefile's targets."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    from finetune import cli

    assert cli.main(["train", "medical-tiny", "model.path=/nowhere/at/all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.path '/nowhere/at/all': no config.json there") and "Traceback" not in err

    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "cmd_recipes", bug)
    with pytest.raises(ValueError, match="an internal bug"):  # not swallowed into 'error: ...'
        cli.main(["recipes"])


def test_help_lists_every_command():
    from finetune import cli

    text = cli.build_parser().format_help()
    for command in ("run RECIPE", "train RECIPE", "eval RUN|RECIPE", "export RUN|RECIPE", "data check", "data convert",
                    "demo medical", "verify packing", "plan RECIPE", "recipes"):
        assert command in text, command


def test_data_check_reads_the_recipes_own_data_with_overrides(tmp_path, small_demo, capsys):
    from finetune import cli

    args = ["data", "check", "--recipe", "medical-tiny", f"data.train={small_demo['train']}",
            f"data.eval={small_demo['eval']}", "data.demo=", "data.max_tokens=64"]
    assert cli.main(args) == 1  # too long at 64 tokens: the override reached the check
    out = capsys.readouterr().out
    assert "data.max_tokens=64" in out and str(small_demo["train"]) in out and str(small_demo["eval"]) in out
    assert cli.main(args[:-1]) == 0
    assert "checked 2 files: 36 samples, 36 ok, 0 errors" in capsys.readouterr().out
    assert cli.main(["data", "check", "data.max_tokens=64"]) == 2  # an override needs --recipe
    assert "need --recipe" in capsys.readouterr().err


def test_makefile_export_replaces_only_with_force_and_check_needs_no_files():
    def dry(*args):
        # STAMP= : without the set-up on first use (tests/test_install.py)
        return subprocess.run(["make", "-n", "--no-print-directory", "STAMP=", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    assert "--force" not in dry("export", "RECIPE=x")
    assert "--force" in dry("export", "RECIPE=x", "FORCE=1")
    assert dry("check", "RECIPE=x").split() == [".venv/bin/python", "-m", "finetune", "data", "check", "--recipe", "x"]


@pytest.mark.slow
def test_the_console_prints_tens_of_lines_not_one_dict_per_step(tmp_path, small_demo):
    import sys

    from conftest import tiny_overrides

    res = subprocess.run([sys.executable, "-m", "finetune", "train", "medical-tiny",
                          *tiny_overrides(tmp_path, small_demo, "train.max_steps=60")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert 15 <= len(steps) <= 25 and steps[-1].startswith("step 60/60  loss ") and "tokens/s" in steps[-1]
    assert not any("'loss'" in ln or "{'train_runtime'" in ln for ln in lines)  # no per-step metrics dicts
    assert len(lines) < 60, len(lines)
    records = [ln for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(records) == 60  # the full record is kept


def test_the_bitsandbytes_cpu_kernel_notice_is_held_until_4bit_runs_on_the_cpu(capsys, caplog, monkeypatch):
    import logging

    import finetune  # noqa: F401  (installs the hold)
    from finetune import runtime as console

    # a fresh process's state: on a CPU with AVX-512 BF16 bitsandbytes really logs the notice at
    # import, and a 4-bit test earlier in this process has then told it already
    monkeypatch.setattr(console, "_bnb_notes", [])
    monkeypatch.setattr(console, "_bnb_told", False)

    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: no network")
    assert "gemm_4bit_forward" not in capsys.readouterr().err and "gemm_4bit_forward" not in caplog.text
    console.tell_4bit_on_cpu()
    console.tell_4bit_on_cpu()
    out = capsys.readouterr().out
    assert out.count("bitsandbytes 4-bit on the CPU") == 1
