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
def miscounted_line_3(monkeypatch):
    """The planner (metadata count) disagrees with the encoding for the sample on line 3."""
    from finetune.families.qwen2_5_omni import Qwen25OmniFamily

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
    from finetune.data.prepare import problems_of
    from finetune.data.schema import load_samples
    from finetune.families.qwen2_5_omni import IMAGE_TOKEN

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
