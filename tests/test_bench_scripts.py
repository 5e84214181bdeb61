"""The benchmark scripts run (on the tiny configs, CPU): they are measured on GPUs, so they must
not rot between GPU sessions."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_step_runs_on_tiny_configs(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_step
    finally:
        sys.path.pop(0)
    assert gpu_step.main(["--tiny", "--device", "cpu", "--max-tokens", "700", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for fam in ("qwen2_5_omni", "baichuan_omni", "gemma4"):
        assert out.count(fam) == 2  # LoRA and QLoRA rows


@pytest.mark.slow
def test_packing_bench_prints_both_mixtures(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import packing
    finally:
        sys.path.pop(0)
    assert packing.main(["--repeats", "1", "--max-tokens", "1024"]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for mixture in ("demo", "long-tail"):
        row = lines[mixture]
        assert row[3] == "100.0%"  # a packed row computes no slot that is not a real token
        assert float(row[2].rstrip("%")) < 100.0  # padded batches do
        assert float(row[10].rstrip("x")) > 0 and float(row[13].rstrip("x")) >= 1.0  # speed-up (min-max) is 2 words


# the `make gpu-check` driver: tests/test_gpu_check.py (its DRY walk runs every part's command)
