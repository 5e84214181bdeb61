"""Tests for the synthetic medical demo dataset (finetune.demo_data)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy import ndimage

from finetune import demo_data
from finetune.demo_data import (
    AUDIO_QUESTION,
    LESION_QUESTIONS,
    MODALITY_QUESTION,
    generate_medical,
)

N_TRAIN, N_EVAL = 24, 12
TASKS = {"lesion", "modality", "audio", "text", "multi"}
SHORT_ANSWERS = {"yes", "no", "chest x-ray", "fundus photograph"}


def _load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _parts(msg: dict) -> list[dict]:
    c = msg["content"]
    return c if isinstance(c, list) else [{"type": "text", "text": c}]


def _media(sample: dict, kind: str) -> list[str]:
    return [p["path"] for m in sample["messages"] for p in _parts(m) if p["type"] == kind]


def _user_texts(sample: dict) -> list[str]:
    return [p["text"] for m in sample["messages"] if m["role"] == "user" for p in _parts(m) if p["type"] == "text"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("demo") / "medical"
    paths = generate_medical(root, n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
    return root, paths


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_larger")
    generate_medical(root, n_train=64, n_eval=32, seed=3)
    return root


def test_files_exist_and_parse(dataset):
    root, paths = dataset
    assert set(paths) == {"train", "eval"}
    assert paths["train"] == root / "train.jsonl" and paths["eval"] == root / "eval.jsonl"
    for name in ("images", "audio", "README.md", "manifest.json"):
        assert (root / name).exists(), name
    assert "generate_medical" in (root / "README.md").read_text()
    assert not list(root.glob("*.tmp-*"))

    n_expected = {"train": N_TRAIN, "eval": N_EVAL}
    for split, path in paths.items():
        samples = _load(path)
        assert len(samples) == n_expected[split]
        ids = [s["id"] for s in samples]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(f"{split}-") for i in ids)
        for s in samples:
            assert set(s) == {"id", "messages", "answer", "task"}
            assert s["task"] in TASKS
            msgs = s["messages"]
            assert msgs[0] == {"role": "system", "content": "You are a radiology assistant."}
            assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * ((len(msgs) - 1) // 2)
            assert msgs[-1]["role"] == "assistant"
            # the reply starts with the capitalised short answer followed by a period
            for m in msgs:
                if m["role"] == "assistant":
                    assert isinstance(m["content"], str)
                    first, _, rest = m["content"].partition(". ")
                    assert first[0].isupper() and rest.endswith(".")
            assert s["answer"] == s["answer"].lower()
            assert msgs[-1]["content"].lower().startswith(s["answer"] + ".")

            images, audios = _media(s, "image"), _media(s, "audio")
            for rel in images:
                with Image.open(root / rel) as im:
                    im.load()
                    assert im.mode == "L" and im.format == "PNG"
                    w, h = im.size
                    assert 112 <= w <= 448 and 112 <= h <= 448
                    assert max(w, h) / min(w, h) <= 1.35
            for rel in audios:
                info = sf.info(str(root / rel))
                assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
                assert 1.0 <= info.frames / info.samplerate <= 2.5
                wav, _ = sf.read(str(root / rel))
                assert np.abs(wav).max() > 0.1

            texts = _user_texts(s)
            if s["task"] == "lesion":
                assert len(images) == 1 and not audios and texts[0] in LESION_QUESTIONS
                assert s["answer"] in {"yes", "no"}
            elif s["task"] == "modality":
                assert len(images) == 1 and texts == [MODALITY_QUESTION]
                assert s["answer"] in {"chest x-ray", "fundus photograph"}
            elif s["task"] == "audio":
                assert len(images) == 1 and len(audios) == 1 and texts == [AUDIO_QUESTION]
                assert s["answer"] in {"yes", "no"}
            elif s["task"] == "text":
                assert not images and not audios and len(texts) == 1
                assert s["answer"] not in SHORT_ANSWERS
            else:  # multi
                assert len(msgs) == 5 and len(images) == 1
                assert texts[0] in LESION_QUESTIONS and texts[1] == MODALITY_QUESTION
                assert msgs[2]["content"].split(".")[0] in {"Yes", "No"}
                assert s["answer"] in {"chest x-ray", "fundus photograph"}


def test_mixture_defaults_counts():
    train = demo_data._task_counts(400, 0.05)
    evl = demo_data._task_counts(100, 0.0)
    assert sum(train.values()) == 400 and sum(evl.values()) == 100
    assert train == {"lesion": 220, "modality": 60, "audio": 80, "text": 20, "multi": 20}
    assert evl == {"lesion": 60, "modality": 15, "audio": 20, "text": 5, "multi": 0}
    for n in range(0, 30):
        c = demo_data._task_counts(n, 0.05)
        assert sum(c.values()) == n and min(c.values()) >= 0 and c["lesion"] % 4 == 0


def test_same_question_pool_and_answers_consistent_with_manifest(larger):
    manifest = json.loads((larger / "manifest.json").read_text())["images"]
    questions = {}
    for split in ("train", "eval"):
        truth = {e["image"]: e for e in manifest[split]}
        samples = _load(larger / f"{split}.jsonl")
        questions[split] = {_user_texts(s)[0] for s in samples if s["task"] == "lesion"}
        tasks = Counter(s["task"] for s in samples)
        assert tasks["lesion"] >= 0.5 * len(samples) and tasks["audio"] > 0 and tasks["text"] > 0
        assert tasks["modality"] > 0
        if split == "train":
            assert tasks["multi"] > 0
        for s in samples:
            images = _media(s, "image")
            if not images:
                continue
            e = truth[images[0]]
            lesion_reply = s["messages"][2]["content"]
            assert lesion_reply.startswith("Yes." if e["lesion"] else "No.") or s["task"] == "modality"
            if s["task"] in ("modality", "multi"):
                assert s["answer"] == {"xray": "chest x-ray", "fundus": "fundus photograph"}[e["kind"]]
            if e["lesion"]:
                assert 0.09 <= e["frac"] <= 0.16
    assert questions["train"] <= set(LESION_QUESTIONS) and questions["eval"] <= set(LESION_QUESTIONS)
    assert len(questions["train"]) == len(LESION_QUESTIONS)


def test_deterministic(tmp_path, dataset):
    root, _ = dataset
    other = tmp_path / "again"
    generate_medical(other, n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
    for name in ("train.jsonl", "eval.jsonl", "manifest.json", "README.md"):
        assert (root / name).read_bytes() == (other / name).read_bytes(), name
    for sub in ("images", "audio"):
        names = sorted(p.name for p in (root / sub).iterdir())
        assert names == sorted(p.name for p in (other / sub).iterdir())
        assert names
        for n in names:
            assert (root / sub / n).read_bytes() == (other / sub / n).read_bytes(), n

    # a different seed gives different data; train and eval images are distinct
    third = tmp_path / "seed1"
    generate_medical(third, n_train=N_TRAIN, n_eval=N_EVAL, seed=1)
    assert (third / "train.jsonl").read_bytes() != (root / "train.jsonl").read_bytes()
    train_imgs = {(root / "images" / p.name).read_bytes() for p in (root / "images").glob("train-*.png")}
    eval_imgs = {(root / "images" / p.name).read_bytes() for p in (root / "images").glob("eval-*.png")}
    assert train_imgs and eval_imgs and not (train_imgs & eval_imgs)


def test_lesion_balance(dataset, larger):
    for root in (dataset[0], larger):
        manifest = json.loads((root / "manifest.json").read_text())["images"]
        for split in ("train", "eval"):
            kind_of = {e["image"]: e["kind"] for e in manifest[split]}
            counts = Counter()
            for s in _load(root / f"{split}.jsonl"):
                if s["task"] == "lesion":
                    counts[(kind_of[_media(s, "image")[0]], s["answer"])] += 1
            assert sum(counts.values()) > 0
            for kind in ("xray", "fundus"):
                assert counts[(kind, "yes")] == counts[(kind, "no")] > 0, (root, split, counts)


def _small(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        return np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)


def _lesion_feature(a: np.ndarray, kind: str) -> float:
    """Max deviation from the organ's median brightness (up for X-ray, down for fundus)."""
    organ = ndimage.binary_fill_holes(a > 45)
    organ = ndimage.binary_erosion(organ, iterations=2)
    v = a[organ]
    med = float(np.median(v))
    return float(v.max() - med) if kind == "xray" else float(med - v.min())


def _best_stump_accuracy(values: list[float], labels: list[bool]) -> float:
    v = np.asarray(values)
    y = np.asarray(labels)
    best = 0.0
    for t in np.unique(v):
        best = max(best, float(np.mean((v >= t) == y)))
    return best


def test_lesion_learnable_at_low_resolution(larger):
    manifest = json.loads((larger / "manifest.json").read_text())["images"]
    for kind in ("xray", "fundus"):
        feats, labels = [], []
        for split in ("train", "eval"):
            for e in manifest[split]:
                if e["kind"] == kind:
                    feats.append(_lesion_feature(_small(larger, e["image"]), kind))
                    labels.append(e["lesion"])
        assert len(feats) >= 20 and 0 < sum(labels) < len(labels)
        assert _best_stump_accuracy(feats, labels) >= 0.95, kind
        # and a fixed, generous margin: the classes are far apart
        yes = [f for f, l in zip(feats, labels) if l]
        no = [f for f, l in zip(feats, labels) if not l]
        assert min(yes) > max(no) + 20, (kind, min(yes), max(no))


def test_kinds_distinct_at_low_resolution(larger):
    manifest = json.loads((larger / "manifest.json").read_text())["images"]
    dark = {"xray": [], "fundus": []}
    for split in ("train", "eval"):
        for e in manifest[split]:
            dark[e["kind"]].append(float((_small(larger, e["image"]) < 40).mean()))
    assert max(dark["xray"]) < 0.2 < min(dark["fundus"])


def test_idempotent_and_force(tmp_path):
    out = tmp_path / "ds"
    paths = generate_medical(out, n_train=8, n_eval=4, seed=0)
    watched = [paths["train"], paths["eval"], *sorted((out / "images").iterdir())]
    before = {p: p.stat().st_mtime_ns for p in watched}
    content = paths["train"].read_bytes()
    again = generate_medical(out, n_train=8, n_eval=4, seed=0)
    assert again == paths
    assert {p: p.stat().st_mtime_ns for p in watched} == before

    # force regenerates (same content), unrelated files in the folder are kept
    (out / "notes.txt").write_text("keep me")
    os.utime(paths["train"], ns=(1, 1))
    generate_medical(out, n_train=8, n_eval=4, seed=0, force=True)
    assert paths["train"].stat().st_mtime_ns != 1
    assert paths["train"].read_bytes() == content
    assert (out / "notes.txt").read_text() == "keep me"


def test_incomplete_dataset_is_regenerated(tmp_path):
    from finetune import fsutil

    out = tmp_path / "ds"
    generate_medical(out, n_train=6, n_eval=2, seed=0)
    # a generation killed midway: the jsonl files invalidated, its temporary folder left behind
    (out / "eval.jsonl").unlink()
    (out / "train.jsonl").write_text("garbage\n")
    stale = fsutil.new_staging_dir(out / ".demo_data")
    (stale / "half.png").write_bytes(b"half")
    paths = generate_medical(out, n_train=8, n_eval=4, seed=0)
    assert len(_load(paths["train"])) == 8 and len(_load(paths["eval"])) == 4
    assert not list(out.glob("*.tmp-*"))


def test_a_folder_the_generator_did_not_make_is_never_written(tmp_path):
    """Only a new or empty folder, or a demo folder it made, and there only its own files."""
    from finetune import fsutil

    def tree(folder):
        return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
                for p in sorted(folder.rglob("*"))}

    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "scan.png").write_bytes(b"mine")
    (mine / "train.jsonl").write_text("my data\n")  # no eval.jsonl: it looked like an incomplete demo
    (mine / ".demo_data-tmp-x").mkdir()
    before = tree(mine)
    for force in (False, True):
        with pytest.raises(fsutil.NotOursError, match=rf"{mine} is not empty .* not a demo dataset folder"):
            generate_medical(mine, n_train=4, n_eval=2, force=force)
        assert tree(mine) == before
    # a demo folder with a file someone added among the generator's: regenerating stops, naming it
    demo = tmp_path / "demo"
    generate_medical(demo, n_train=4, n_eval=2)
    (demo / "images" / "added.png").write_bytes(b"added")
    before = tree(demo)
    with pytest.raises(fsutil.NotOursError, match=r"images/added.png"):
        generate_medical(demo, n_train=4, n_eval=2, force=True)
    assert tree(demo) == before
    # a demo folder generated before the marker existed is recognised by its README and manifest
    legacy = tmp_path / "legacy"
    generate_medical(legacy, n_train=4, n_eval=2)
    (legacy / fsutil.MARKER).unlink()
    (legacy / "eval.jsonl").unlink()
    paths = generate_medical(legacy, n_train=4, n_eval=2)
    assert len(_load(paths["eval"])) == 2 and fsutil.read_marker(legacy)["what"] == "demo dataset"


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert demo_data.main([str(out), "--n-train", "6", "--n-eval", "4", "--seed", "2"]) == 0
    assert "train.jsonl" in capsys.readouterr().out
    assert len(_load(out / "train.jsonl")) == 6 and len(_load(out / "eval.jsonl")) == 4
    assert "--seed 2" in (out / "README.md").read_text()


def test_rejects_negative_sizes(tmp_path):
    with pytest.raises(ValueError):
        generate_medical(tmp_path / "x", n_train=-1)
