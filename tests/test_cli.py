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
    for command in ("run RECIPE", "train RECIPE", "eval RECIPE", "export RUN", "data check", "data convert",
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
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert "--force" not in dry("export", "RECIPE=x")
    assert "--force" in dry("export", "RECIPE=x", "FORCE=1")
    assert dry("check", "RECIPE=x").split() == [".venv/bin/python", "-m", "finetune", "data", "check", "--recipe", "x"]
