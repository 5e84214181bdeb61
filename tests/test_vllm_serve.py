"""vLLM serves our merged Qwen2.5-Omni and Qwen3-Omni exports, thinker-only and full, with our greedy answers
(issue 30). Opt-in: it needs the separate vLLM venv (bash tools/vllm_venv.sh, about 4 minutes and 3.5 GB) and
takes 10-15 minutes on 2 CPU cores (614 s measured on a loaded machine: 4 short training runs, 6 vLLM server
starts), more than CI's budget allows:

    OMNI_TEST_VLLM=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_serve.py

The work is bench/gpu_vllm.py's (the same check is a `make gpu-check` part); see its docstring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

VENV = os.environ.get("OMNI_VLLM_VENV", os.path.expanduser("~/.cache/omni-finetune/vllm-venv"))

pytestmark = pytest.mark.skipif(os.environ.get("OMNI_TEST_VLLM") != "1",
                                reason="opt-in (10-15 min): OMNI_TEST_VLLM=1, after bash tools/vllm_venv.sh")


def test_vllm_serves_our_exports_with_our_greedy_answers(tmp_path):
    vllm = os.path.join(VENV, "bin", "vllm")
    assert os.path.exists(vllm), f"no vLLM venv at {VENV}: bash tools/vllm_venv.sh (or set OMNI_VLLM_VENV)"
    out = tmp_path / "results.json"
    res = subprocess.run([sys.executable, "bench/gpu_vllm.py", "--vllm", vllm, "--out", str(tmp_path / "work"),
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert out.exists(), res.stdout[-4000:] + res.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    served = {}
    for r in results:
        served.setdefault(r["base"], []).append(r)
    assert set(served) == {"qwen2_5_omni", "qwen2_5_omni-full", "qwen3_omni_moe", "qwen3_omni_moe-full"}
    for base, tries in served.items():
        last = tries[-1]
        assert last["ok"], f"{base} ({last['served']}): vLLM did not start: {last['error']}"
        assert len(last["rows"]) >= 3, last  # image, audio+image and text-only probes
        for row in last["rows"]:
            assert row["diffs"] == [], f"{base} ({last['served']}) {row['id']}: {row}"
        if base.endswith("-full"):
            assert [t["served"] for t in tries] == ["as exported"], tries  # a full export serves as it is
    assert res.returncode == 0, res.stdout[-4000:]
