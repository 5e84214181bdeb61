"""Models and datasets by hub id, from a temporary HF cache pre-filled in huggingface_hub's layout.

Nothing is downloaded: HF_HUB_OFFLINE=1 (or an endpoint that refuses connections) makes the cache
the only answer, as on a machine without network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_recipe
from hf_cache import folder_files, prefill
from hf_tables import Source, chat_table

MODEL_COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache for this test, offline; the datasets library's cache beside it."""
    import datasets

    from finetune import hub

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    hub.clear_resolved()
    return cache


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from finetune.families import get_family

    return get_family("qwen2_5_omni").materialize_tiny(0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from finetune.demo_data import generate_medical

    return generate_medical(tmp_path_factory.mktemp("hubdemo"), n_train=12, n_eval=4, seed=0)


def put_dataset(cache: Path, demo: dict, tmp_path: Path) -> Path:
    """The demo's train split as a dataset repo: data/train-00000-of-00001.parquet (chat rows with
    the images and audio embedded) and a README, as the Hub serves them."""
    import datasets

    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(chat_table(demo["train"])).to_parquet(str(parquet))
    return prefill(cache, "acme/tiny-med", {"data/train-00000-of-00001.parquet": parquet,
                                            "README.md": b"---\nlicense: cc0-1.0\n---\n# tiny med\n"},
                   repo_type="dataset", commit=DATA_COMMIT)


def test_hub_ids_resolve_from_the_prefilled_cache_offline(hf_cache, tiny_folder):
    from finetune import hub
    from finetune.families import family_for

    snap = prefill(hf_cache, "acme/tiny-omni", folder_files(tiny_folder), commit=MODEL_COMMIT, refs=("main", "v1"))
    assert hub.resolve_model("acme/tiny-omni") == snap
    assert hub.resolve_model("acme/tiny-omni", "v1") == snap
    assert hub.resolve_model("acme/tiny-omni", MODEL_COMMIT) == snap
    fam = family_for("acme/tiny-omni")
    assert fam.name == "qwen2_5_omni" and fam.resolve_path("acme/tiny-omni", revision="v1") == snap
    assert (snap / "config.json").is_symlink() and json.loads((snap / "config.json").read_text())["model_type"]
    recorded = hub.resolved()
    assert {(e["id"], e["revision"], e["commit"]) for e in recorded} == {
        ("acme/tiny-omni", "main", MODEL_COMMIT), ("acme/tiny-omni", "v1", MODEL_COMMIT),
        ("acme/tiny-omni", MODEL_COMMIT, MODEL_COMMIT)}
    assert all(e["offline"] and e["folder"] == str(snap) for e in recorded)


def test_a_missing_cache_entry_gives_the_download_command(hf_cache, tiny_folder):
    from finetune import hub
    from finetune.errors import MissingFileError
    from finetune.families import family_for

    with pytest.raises(MissingFileError) as e:
        family_for("Qwen/Qwen2.5-Omni-7B")
    assert "hf download Qwen/Qwen2.5-Omni-7B --revision main" in str(e.value)
    assert "HF_HUB_OFFLINE is set" in str(e.value) and str(hf_cache) in str(e.value)
    with pytest.raises(MissingFileError, match="hf download acme/vqa --revision v2 --repo-type dataset"):
        hub.resolve_dataset("acme/vqa", "v2")
    # a revision the cache does not hold is missing too, even when another one is there
    prefill(hf_cache, "acme/tiny-omni", folder_files(tiny_folder), commit=MODEL_COMMIT)
    with pytest.raises(MissingFileError, match="hf download acme/tiny-omni --revision v9"):
        hub.resolve_model("acme/tiny-omni", "v9")
    assert hub.resolved() == []


def test_without_network_the_cache_answers(hf_cache, tiny_folder, monkeypatch):
    """Not offline, but the Hub cannot be reached (an endpoint that refuses connections)."""
    from finetune import hub
    from finetune.errors import MissingFileError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    snap = prefill(hf_cache, "acme/tiny-omni", folder_files(tiny_folder), commit=MODEL_COMMIT)
    assert hub.resolve_model("acme/tiny-omni") == snap
    with pytest.raises(MissingFileError, match="the Hub cannot be reached; download it first: hf download acme/other"):
        hub.resolve_model("acme/other")


def test_local_paths_and_tiny_models_make_no_hub_call(hf_cache, tiny_folder, demo, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from finetune import hub
    from finetune.data.sources import load_source
    from finetune.families import family_for
    from finetune.recipe import load_recipe

    def no_hub(*a, **k):
        raise AssertionError("a hub function was called")

    for name in ("snapshot_download", "hf_hub_download", "try_to_load_from_cache"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    monkeypatch.setattr(hub, "_snapshot", no_hub)
    fam = family_for(str(tiny_folder))
    assert fam.resolve_path(str(tiny_folder)) == tiny_folder
    assert family_for("tiny:qwen2_5_omni").resolve_path("tiny:qwen2_5_omni") == tiny_folder
    folder = tmp_path / "disk"
    datasets.Dataset.from_list(chat_table(demo["train"])).save_to_disk(str(folder))
    recipe = load_recipe("medical-tiny")
    assert len(load_source(str(folder), recipe)[0]) == 12
    assert len(load_source(Source(path=str(demo["train"])), recipe)[0]) == 12
    assert hub.resolved() == []


def test_a_string_that_is_no_folder_and_no_hub_id_keeps_the_local_folder_message(hf_cache):
    from finetune.errors import MissingFileError
    from finetune.families import family_for, get_family
    from finetune.hub import is_hub_id

    assert is_hub_id("Qwen/Qwen2.5-Omni-7B") and is_hub_id("acme/tiny-omni")
    for text in ("./models/qwen", "/models/Qwen2.5-Omni-7B", "~/qwen", "a/b/c", "qwen", "a--b/c", "org/.x"):
        assert not is_hub_id(text), text
    with pytest.raises(MissingFileError, match="no config.json there; point it at a local model folder"):
        family_for("/models/Qwen2.5-Omni-7B")
    with pytest.raises(MissingFileError, match=r"model.path '\./nope' is not a folder"):
        get_family("qwen2_5_omni").resolve_path("./nope")


@pytest.mark.slow
def test_tiny_model_and_dataset_by_hub_id_train_offline(hf_cache, tiny_folder, demo, tmp_path):
    """medical-tiny from model.path=acme/tiny-omni and data.train={hub: acme/tiny-med} with
    HF_HUB_OFFLINE=1; the run folder records both commits."""
    from finetune import hub
    from finetune.train import train

    snap = prefill(hf_cache, "acme/tiny-omni", folder_files(tiny_folder), commit=MODEL_COMMIT)
    data_snap = put_dataset(hf_cache, demo, tmp_path)
    run = train(tiny_recipe(tmp_path, demo, "model.path=acme/tiny-omni", "data.train=[{hub: acme/tiny-med}]",
                            "train.max_steps=2", "train.save_steps=10"))
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    resolved = json.loads((run / "resolved_sources.json").read_text())
    assert {(e["kind"], e["id"], e["revision"], e["commit"], e["folder"]) for e in resolved} == {
        ("model", "acme/tiny-omni", "main", MODEL_COMMIT, str(snap)),
        ("dataset", "acme/tiny-med", "main", DATA_COMMIT, str(data_snap))}
    assert json.loads((run / "adapter" / "base_model.json").read_text())["base_path"] == str(snap)
    assert "acme/tiny-omni" in (run / "recipe.yaml").read_text()
    # the export merges into, and copies the files of, the resolved snapshot
    from finetune.export import export_run

    merged = export_run(run, force=True, fmt="merged")["merged"]
    manifest = json.loads((merged / "export_manifest.json").read_text())
    assert manifest["verify"]["max_abs_diff"] <= manifest["verify"]["tolerance"]
    for name in ("config.json", "tokenizer_config.json"):
        assert (merged / name).is_file() and not (merged / name).is_symlink()
    assert json.loads((merged / "config.json").read_text())["model_type"] == \
        json.loads((snap / "config.json").read_text())["model_type"]
    # a second run in the same process records its own sources only (none: local data, tiny model)
    assert hub.resolved()
    run2 = train(tiny_recipe(tmp_path / "local", demo, "train.max_steps=1"))
    assert not (run2 / "resolved_sources.json").exists()

