"""Data mixtures: each source's share of an epoch's tokens, seeded, and the same after resume."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import tiny_recipe
from run_files import losses


@dataclass
class Src:
    label: str
    weight: float = 1.0
    epochs: float | None = None


def shares(picks, lengths):
    toks = [sum(ls[i] for i in idx) for idx, ls in zip(picks, lengths)]
    return [t / sum(toks) for t in toks]


def test_weights_give_token_shares_and_epochs_give_multiples():
    from finetune.mixture import select

    rng = np.random.default_rng(0)
    a = rng.integers(40, 400, size=300).tolist()  # domain data: 300 samples
    b = rng.integers(40, 400, size=900).tolist()  # general data, three times as many
    picks, info = select([Src("a", 3), Src("b", 1)], [a, b], seed=1)
    got = shares(picks, [a, b])
    assert got[0] == pytest.approx(0.75, abs=0.02) and got[1] == pytest.approx(0.25, abs=0.02)
    # the pool is what the sources hold together: a is repeated (more than once over), b subsampled
    assert sum(a) * 2 < info[0].picked_tokens < sum(a) * 3.5 and info[1].picked_tokens < sum(b) * 0.4
    assert all(0 <= i < 900 for i in picks[1]) and len(set(picks[1])) == len(picks[1])  # b: no repeats
    # seeded: the same selection again, another for another seed
    again, _ = select([Src("a", 3), Src("b", 1)], [a, b], seed=1)
    other, _ = select([Src("a", 3), Src("b", 1)], [a, b], seed=2)
    assert again == picks and other != picks
    # epochs: 0.5 of b's tokens (a seeded half), a by weight over what it alone holds: all of it once
    picks, info = select([Src("a", 1), Src("b", epochs=0.5)], [a, b], seed=1)
    assert info[1].picked_tokens == pytest.approx(sum(b) / 2, abs=400)
    assert sorted(picks[0]) == list(range(300))
    picks, _ = select([Src("b", epochs=2.0)], [b], seed=1)
    assert sorted(picks[0]) == sorted(list(range(900)) * 2)


def test_one_source_keeps_every_sample_once_in_order():
    from finetune.mixture import select

    picks, info = select([Src("only", 5.0)], [[3, 1, 2]], seed=0)
    assert picks == [[0, 1, 2]] and info[0].picked_tokens == 6


@pytest.mark.slow
def test_a_mixture_trains_its_shares_and_resumes_in_the_same_order(tmp_path, small_demo, monkeypatch):
    """Two JSONL sources at 3:1: mixture.json's token shares within 2 points of 75/25; a run
    interrupted after step 5 and resumed trains the same rows (the same losses) as one that was not."""
    from finetune.demo_data import generate_medical
    from finetune.train import train

    other = generate_medical(tmp_path / "general", n_train=40, n_eval=2, seed=7)
    mix = (f"data.train=[{{path: {small_demo['train']}, weight: 3, name: domain}}, "
           f"{{path: {other['train']}, weight: 1, name: general}}]")
    ref = train(tiny_recipe(tmp_path / "a", small_demo, mix))
    m = json.loads((ref / "mixture.json").read_text())
    by = {s["name"]: s for s in m["sources"]}
    assert by["domain"]["share"] == pytest.approx(0.75, abs=0.02)
    assert by["general"]["share"] == pytest.approx(0.25, abs=0.02)
    assert by["domain"]["epoch_samples"] > by["domain"]["samples"]  # the smaller source is repeated

    recipe = tiny_recipe(tmp_path / "b", small_demo, mix)
    monkeypatch.setenv("FINETUNE_CRASH_AFTER_STEP", "5")
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    monkeypatch.delenv("FINETUNE_CRASH_AFTER_STEP")
    resumed = train(recipe)
    assert json.loads((resumed / "mixture.json").read_text()) == m
    want, got = losses(ref), losses(resumed)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
