"""Data prepared for LLaMA-Factory works here: `data check` reads it directly, `data convert`
turns it into our JSONL, and medical-tiny trains from the converted file, and from a file in
LLaMA-Factory's v1 format given directly as data.train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_recipe


@pytest.mark.slow
def test_medical_tiny_trains_from_a_converted_llamafactory_dataset(tmp_path, small_demo):
    from finetune.data.check import check_dataset
    from finetune.data.convert import llamafactory_from_ours
    from finetune.train import train

    # the LLaMA-Factory file beside its media (a copy of the demo), as LLaMA-Factory's data/ folder holds them
    data = tmp_path / "data"
    shutil.copytree(small_demo["train"].parent, data)
    lf = data / "medical_sharegpt.json"
    n = llamafactory_from_ours(data / "train.jsonl", lf)
    records = json.loads(lf.read_text())
    assert len(records) == n == 24
    assert any("<image>" in m["content"] for r in records for m in r["messages"]) and "images" in records[0]

    report = check_dataset([lf])  # read directly, converted in memory
    assert report.n_samples == 24 and report.n_ok == 24, report.format()

    # the same file in another folder names its media through '..': refused, as in our JSONL
    elsewhere = tmp_path / "lf" / "medical_sharegpt.json"
    llamafactory_from_ours(data / "train.jsonl", elsewhere)
    report = check_dataset([elsewhere])
    with_media = sum(any(r.get(c) for c in ("images", "audios", "videos")) for r in records)
    assert with_media > 20 and report.n_ok == 24 - with_media, report.format()
    assert report.error_counts() == {"outside_path": with_media}
    assert check_dataset([elsewhere], allow_outside_paths=True).n_ok == 24

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


def v1_record(sample: dict) -> dict:
    """One of our samples as LLaMA-Factory v1 writes it ({"type", "value"} parts, loss_weight per turn)."""
    kinds = {"image": "image_url", "audio": "audio_url", "video": "video_url"}
    messages = []
    for m in sample["messages"]:
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        parts = [{"type": "text", "value": p["text"]} if p["type"] == "text" else {"type": kinds[p["type"]],
                                                                                  "value": p["path"]}
                 for p in content]
        messages.append({"role": m["role"], "content": parts, "loss_weight": float(m["role"] == "assistant")})
    return {"messages": messages}


@pytest.mark.slow
def test_medical_tiny_trains_from_a_llamafactory_v1_file_given_as_data_train(tmp_path, small_demo):
    from finetune.data.reading import read_split
    from finetune.train import train

    data = tmp_path / "data"
    shutil.copytree(small_demo["train"].parent, data)
    records = [v1_record(json.loads(x)) for x in (data / "train.jsonl").read_text().splitlines()]
    # a follow-up turn kept as context (loss_weight 0 on the first answer), as v1 files may hold
    first = records[0]["messages"]
    first[-1]["loss_weight"] = 0.0
    first += [{"role": "user", "content": [{"type": "text", "value": "Are you sure?"}], "loss_weight": 0.0},
              {"role": "assistant", "content": [{"type": "text", "value": "Yes."}], "loss_weight": 1.0}]
    v1 = data / "v1_train.jsonl"
    v1.write_text("".join(json.dumps(r) + "\n" for r in records))
    eval_v1 = data / "v1_eval.jsonl"
    eval_v1.write_text("".join(json.dumps(v1_record(json.loads(x))) + "\n"
                               for x in (data / "eval.jsonl").read_text().splitlines()))

    recipe = tiny_recipe(tmp_path, small_demo, f"data.train={v1}", f"data.eval={eval_v1}", "train.max_steps=3")
    samples, errors = read_split(recipe.data.train, recipe)
    assert not errors and len(samples) == 24 and [m.loss for m in samples[0].messages][-3:] == [False, True, True]
    run = train(recipe)
    assert (run / "adapter" / "adapter_config.json").exists()
    assert not (run / "skipped.jsonl").exists() or not (run / "skipped.jsonl").read_text().strip()
