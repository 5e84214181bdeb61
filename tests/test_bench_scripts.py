"""The benchmark scripts run (on the tiny configs, CPU): they are measured on GPUs, so they must
not rot between GPU sessions."""

from __future__ import annotations

import sys

from conftest import ROOT


def test_gpu_step_runs_on_tiny_configs(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_step
    finally:
        sys.path.pop(0)
    assert gpu_step.main(["--tiny", "--device", "cpu", "--max-tokens", "700", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for fam in ("qwen2_5_omni", "baichuan_omni"):
        assert out.count(fam) == 2  # LoRA and QLoRA rows
