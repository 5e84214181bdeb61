"""Bad input, everywhere: one broken sample per failure kind, named by `data check`, skipped and
reported by training with `on_error: skip`, and stopping training with `raise` before step 1."""

from __future__ import annotations

import json

import pytest

from finetune.models import processor_of

from bad_corpus import write_corpus
from conftest import tiny_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_corpus(folder)


def test_the_corpus_covers_at_least_25_kinds(corpus):
    _, expected = corpus
    assert len(set(expected.values())) >= 25


def test_data_check_names_every_broken_sample(corpus):
    from finetune.data.check import check_dataset
    from finetune.families import get_family
    from finetune.recipe import load_recipe

    folder, expected = corpus
    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny")
    proc = processor_of(recipe, fam)
    report = check_dataset([folder / "train.jsonl"], token_counter=lambda s: fam.count_tokens(s, proc),
                           max_tokens=256)
    got = {e.line: e.kind for e in report.errors}
    assert got == expected
    assert f"{len(expected)}" in report.format()
    for e in report.errors:  # one line each: file, line, field and the fix
        assert f"train.jsonl:{e.line}" in str(e) and e.fix


@pytest.mark.slow
def test_training_skips_exactly_the_broken_samples(corpus, tmp_path, small_demo):
    from finetune.train import train

    folder, expected = corpus
    recipe = tiny_recipe(tmp_path, small_demo, f"data.train={folder / 'train.jsonl'}", "data.on_error=skip",
                         "train.max_steps=2")
    run = train(recipe)
    rec = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert {r["line"]: r["kind"] for r in rec} == expected
    assert (run / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_training_with_raise_stops_before_the_first_step_naming_the_first(corpus, tmp_path, small_demo):
    from finetune.data.schema import DataError
    from finetune.train import train

    folder, expected = corpus
    recipe = tiny_recipe(tmp_path, small_demo, f"data.train={folder / 'train.jsonl'}", "data.on_error=raise")
    first = min(expected)
    with pytest.raises(DataError, match=rf"train.jsonl:{first}\b") as info:
        train(recipe)
    assert info.value.kind == expected[first]
    run = recipe.run_dir
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_other_formats_are_checked_too(tmp_path):
    """A LLaMA-Factory file is read directly; a placeholder/media count mismatch is named."""
    from finetune.data.check import check_dataset

    write_corpus(tmp_path)  # for its media
    good = {"messages": [{"role": "user", "content": "<image>Is there a lesion?"},
                         {"role": "assistant", "content": "Yes."}], "images": ["ok.png"]}
    bad = {"messages": [{"role": "user", "content": "<image><image>Compare."},
                        {"role": "assistant", "content": "Same."}], "images": ["ok.png"]}
    path = tmp_path / "lf.json"
    path.write_text(json.dumps([good, good, bad]))
    report = check_dataset([path])
    assert report.n_samples == 3 and report.n_ok == 2  # every record counts, as lines of our JSONL do
    assert [e.kind for e in report.errors] == ["placeholder_mismatch"]
    assert "lf.json: record[2].images" in str(report.errors[0])  # records counted from 0
