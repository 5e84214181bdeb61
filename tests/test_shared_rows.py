"""Data-loader workers share the packed rows: over several epochs each sample is encoded once in
all (by the checks before step 1, or by the first worker that needs its row), not once per worker
and epoch; the rows are the ones one process collates."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_demo):
    from finetune import trainer
    from finetune.data import reading
    from finetune.families import family_for

    tmp = tmp_path_factory.mktemp("rows")
    recipe = tiny_recipe(tmp, small_demo, "data.num_workers=2", "data.max_tokens=160")
    family = family_for(recipe.model.path)
    loaded = trainer.load_for_training(recipe, family, "fp32")
    samples = reading.read_split(recipe.data.train, recipe)[0]
    return recipe, family, loaded, samples, tmp


def _count_encodes(monkeypatch, family, path):
    """Every encode, in this process or a worker forked from it, appends a line to `path`."""
    original = type(family).encode

    def encode(self, sample, processor, **kw):
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {sample.where}\n")
        return original(self, sample, processor, **kw)

    monkeypatch.setattr(type(family), "encode", encode)


def _epochs(ds, collator, n: int, seed: int = 0):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=1, shuffle=True, generator=g, num_workers=2, persistent_workers=True,
                        collate_fn=collator, multiprocessing_context="fork")
    return [batch for _ in range(n) for batch in loader]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("checks_encode", [True, False], ids=["checks-kept", "workers-encode"])
def test_two_workers_over_two_epochs_encode_each_row_once(setup, tmp_path, monkeypatch, checks_encode):
    from finetune import collate
    from finetune.data import reading
    from finetune.packing import EncodedCache

    recipe, family, loaded, samples, _ = setup
    rope = family.rope_index(loaded.model)
    log = tmp_path / "encodes.txt"
    _count_encodes(monkeypatch, family, log)
    encodings = EncodedCache(family, loaded.processor, [], rope, 1 << 30) if checks_encode else None
    # the checks before step 1 encode every sample when no earlier run remembered them
    monkeypatch.setattr("finetune.data.reading.record_path", lambda *a, **k: tmp_path / "no-record.json")
    good, lengths = reading.prepare_split(samples, family, loaded, recipe, [], encodings)
    checks = len(log.read_text().splitlines()) if log.exists() else 0
    assert checks == len(good)
    if encodings is not None:
        encodings.samples = good
    else:
        log.unlink()
    folder = tmp_path / "rows"
    folder.mkdir()
    ds, collator = collate.make_collator(recipe, family, loaded.processor, good, lengths, rope, "varlen",
                                   family.tower_inputs(loaded.model), encodings, rows=folder)
    batches = _epochs(ds, collator, 2)
    total = len(log.read_text().splitlines()) if log.exists() else 0
    assert total == len(good), f"{total} encodes for {len(good)} samples over 2 epochs with 2 workers"
    assert len(batches) == 2 * len(ds)

    # the rows are those one process collates, sample for sample
    _, alone = collate.make_collator(recipe, family, loaded.processor, good, lengths, rope, "varlen",
                               family.tower_inputs(loaded.model))
    for b in batches[: len(ds)]:
        row = next(i for i in range(len(ds)) if torch.equal(alone([ds[i]])["input_ids"], b["input_ids"]))
        assert _same(b, alone([ds[row]]))


def test_without_shared_rows_each_worker_encodes_again(setup, tmp_path, monkeypatch):
    """The control (how it was): a cache in each worker, reshuffled rows dealt across them."""
    from finetune import collate

    recipe, family, loaded, samples, _ = setup
    rope = family.rope_index(loaded.model)
    log = tmp_path / "encodes.txt"
    _count_encodes(monkeypatch, family, log)
    lengths = [family.count_tokens(s, loaded.processor) for s in samples]
    ds, collator = collate.make_collator(recipe, family, loaded.processor, samples, lengths, rope, "varlen",
                                   family.tower_inputs(loaded.model))
    _epochs(ds, collator, 2)
    assert len(log.read_text().splitlines()) > len(samples)
