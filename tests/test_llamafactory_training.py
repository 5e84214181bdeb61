"""Data prepared for LLaMA-Factory works here: `data check` reads it directly, `data convert`
turns it into our JSONL, and medical-tiny trains from the converted file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_recipe


@pytest.mark.slow
def test_medical_tiny_trains_from_a_converted_llamafactory_dataset(tmp_path, small_demo):
    from finetune.data.check import check_dataset
    from finetune.data.convert import llamafactory_from_ours
    from finetune.train import train

    lf = tmp_path / "lf" / "medical_sharegpt.json"
    lf.parent.mkdir()
    n = llamafactory_from_ours(small_demo["train"], lf)
    records = json.loads(lf.read_text())
    assert len(records) == n == 24
    assert any("<image>" in m["content"] for r in records for m in r["messages"]) and "images" in records[0]

    report = check_dataset([lf])  # read directly, converted in memory
    assert report.n_samples == 24 and report.n_ok == 24, report.format()

    out = tmp_path / "converted" / "train.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", "data", "convert", "--from", "llamafactory", str(lf),
                          str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = [json.loads(x) for x in small_demo["train"].read_text().splitlines()]
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert [m["role"] for m in back[0]["messages"]] == [m["role"] for m in ours[0]["messages"]]

    recipe = tiny_recipe(tmp_path, small_demo, f"data.train={out}", "train.max_steps=3",
                         "data.allow_outside_paths=true")
    run = train(recipe)
    assert (run / "adapter" / "adapter_config.json").exists()
    assert not (run / "skipped.jsonl").exists() or not (run / "skipped.jsonl").read_text().strip()
