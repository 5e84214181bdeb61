"""Nothing that can be known before step 1 fails after it: every sample is encoded and checked as
the model's forward checks it, and the eval/export generation path runs, before training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe


def _no_training_happened(run):
    assert not (run / "metrics.jsonl").exists()
    assert not list(run.glob("checkpoints/checkpoint-*"))


@pytest.fixture()
def miscounted_line_3(monkeypatch, tmp_path):
    """The planner (metadata count) disagrees with the encoding for the sample on line 3 (and the
    record of samples already checked starts empty: other tests checked the same files)."""
    from finetune.data import reading
    from finetune.families.qwen2_5_omni import Qwen25OmniFamily

    monkeypatch.setattr(reading, "cache_root", lambda: tmp_path / "cache")

    real = Qwen25OmniFamily.count_tokens

    def count(self, s, proc):
        return real(self, s, proc) + (1 if s.line == 3 else 0)

    monkeypatch.setattr(Qwen25OmniFamily, "count_tokens", count)


def test_an_inconsistent_sample_stops_the_run_before_step_1(tmp_path, small_demo, miscounted_line_3):
    from finetune.data.schema import DataError
    from finetune.train import train

    recipe = tiny_recipe(tmp_path, small_demo)
    with pytest.raises(DataError, match=r"train.jsonl:3: messages: encodes to (\d+) tokens, but \d+ were planned"):
        train(recipe)
    _no_training_happened(tmp_path / "run")


def test_an_inconsistent_sample_is_skipped_and_counted(tmp_path, small_demo, miscounted_line_3):
    from finetune.train import train

    run = train(tiny_recipe(tmp_path, small_demo, "data.on_error=skip", "train.max_steps=1"))
    rec = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rec] == [(3, "inconsistent")]


def test_placeholders_against_feature_rows(tiny_qwen, small_demo):
    """A prompt with one image token too many is found from the media tensors' shapes."""
    from finetune.data.samples import problems_of
    from finetune.data.schema import load_samples
    from finetune.families.shared import IMAGE_TOKEN

    fam, loaded = tiny_qwen
    proc = loaded.processor
    config = fam.read_config(loaded.base_path)
    samples, _ = load_samples(small_demo["train"])
    s = next(x for x in samples if "image" in x.modalities())
    enc = fam.encode(s, proc)
    assert fam.check_encoded(enc, config, planned=enc.num_tokens) == []
    tid = proc.token_ids[IMAGE_TOKEN]
    at = int((enc.input_ids == tid).nonzero()[0])
    enc.input_ids = torch.cat([enc.input_ids[:at], torch.tensor([tid]), enc.input_ids[at:]])
    (problem,) = fam.check_encoded(enc, config)
    assert "image placeholder token(s)" in problem and "feature row(s)" in problem
    # a model config whose image token is another id than the tokenizer's: every image sample fails
    other = json.loads(json.dumps(config))
    other["image_token_index"] = tid + 1
    n, errors = problems_of(s, fam, proc, other, None, None)
    assert n is not None and [e.kind for e in errors] == ["inconsistent"] and errors[0].line == s.line


def test_a_broken_generation_path_stops_the_run_before_step_1(tmp_path, small_demo, monkeypatch):
    """As with transformers 5.24 before the fix: media handed to every decoding step again."""
    from finetune.families.baichuan_model import BaichuanOmniModel
    from finetune.train import train

    real = BaichuanOmniModel.embed

    def embed(self, *args, decoding=False, **kwargs):
        return real(self, *args, decoding=False, **kwargs)  # the decoding steps' media are not ignored

    monkeypatch.setattr(BaichuanOmniModel, "embed", embed)
    recipe = tiny_recipe(tmp_path, small_demo, "model.path=tiny:baichuan_omni")
    with pytest.raises(RuntimeError, match="before training: evaluation's generation .* Nothing was trained"):
        train(recipe)
    _no_training_happened(tmp_path / "run")


def test_checked_samples_are_remembered_until_a_file_or_setting_changes(tmp_path, small_demo, tiny_qwen):
    import shutil

    from finetune.data.prepare import prepare
    from finetune.data.schema import load_samples

    fam, loaded = tiny_qwen
    data = tmp_path / "d"
    shutil.copytree(small_demo["train"].parent, data)
    samples, _ = load_samples(data / "train.jsonl")
    config = fam.read_config(loaded.base_path)
    record = tmp_path / "record.json"

    def run(proc=loaded.processor):
        stats = {}
        good, lengths, errors = prepare(samples, fam, proc, config, None, max_tokens=512, record=record, stats=stats)
        assert not errors and len(good) == len(samples)
        return stats

    assert run() == {"checked": len(samples), "remembered": 0}
    assert run() == {"checked": 0, "remembered": len(samples)}
    img = next(p.path for s in samples for p in s.media() if p.type == "image")
    users = sum(any(p.path == img for p in s.media()) for s in samples)
    Image = pytest.importorskip("PIL.Image")
    Image.open(img).convert("RGB").resize((90, 70)).save(img)  # same path, new size: recount and recheck
    assert run() == {"checked": users, "remembered": len(samples) - users}
    import dataclasses

    other = dataclasses.replace(loaded.processor, max_pixels=loaded.processor.max_pixels // 2)
    assert run(other)["checked"] == len(samples)


LAUNCH = '''
import os, sys

import finetune.probes as probes

if os.environ["RANK"] == os.environ["BREAK_RANK"]:
    def generate(*args, **kwargs):
        raise RuntimeError("generation broken on this rank (test)")

    probes.generate = generate

from finetune.cli import main

sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.parametrize("broken", [0, 1])
def test_a_check_failing_on_one_rank_stops_every_rank_before_step_1(tmp_path, small_demo, broken):
    """DDP over two processes (gloo), started without torchrun's agent (as srun or mpirun start
    ranks: nobody kills the others when one fails). The check fails on one rank only; every rank
    must stop before step 1 with that rank's error, within seconds of each other. A rank that went
    on would wait in its first gradient all-reduce until gloo's timeout (30 minutes)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from conftest import ROOT, tiny_overrides

    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "BREAK_RANK": str(broken),
            "FINETUNE_ALL_RANKS_PRINT": "1"}
    cmd = [sys.executable, str(launch), "train", "medical-tiny",
           *tiny_overrides(tmp_path, small_demo, "train.max_steps=2", "data.num_workers=0")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    ended: dict[int, float] = {}
    deadline = time.time() + 600
    while len(ended) < 2 and time.time() < deadline and not (ended and time.time() - min(ended.values()) > 60):
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate()[0] for p in procs]
    assert len(ended) == 2, f"rank(s) {sorted({0, 1} - set(ended))} still running 60 s after the other ended:\n" + \
        "\n".join(o[-2000:] for o in outs)
    assert abs(ended[0] - ended[1]) < 30
    for r, (p, out) in enumerate(zip(procs, outs)):  # each rank stopped with the check's error of the broken one
        assert p.returncode != 0, f"rank {r} finished:\n{out[-3000:]}"
        assert "generation broken on this rank (test)" in out, f"rank {r} stopped otherwise:\n{out[-3000:]}"
    for out in outs:
        assert (f"before training: evaluation's generation or the export's probe forward fails on rank {broken} of 2"
                in out), out[-3000:]
    _no_training_happened(tmp_path / "run")
