"""Datasets as they are published: Parquet files and save_to_disk folders with embedded media.

The tables are built here from the synthetic demo set (the same samples as its JSONL), with the
images embedded as PNG bytes and the audio as arrays, and must train exactly as the JSONL does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import tiny_recipe
from hf_tables import Source, chat_table, save_disk, save_vqa_parquet, vqa_table, write_jsonl

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """The datasets library's own cache (Arrow copies of Parquet files) in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from finetune.demo_data import generate_medical

    return generate_medical(tmp_path_factory.mktemp("hfdemo"), n_train=16, n_eval=4, seed=0)


def load(src, media_dir: Path, **kw):
    from finetune.data.hf import load_hf_samples

    return load_hf_samples(src, media_dir=media_dir, **kw)


def structure(samples) -> list:
    return [(s.id, s.task, s.answer, [(m.role, [(p.type, p.text) for p in m.parts]) for m in s.messages])
            for s in samples]


def media_content(samples) -> list:
    """What each media file decodes to, in order (pixels of images, samples of audio)."""
    from finetune.data import media

    out = []
    for s in samples:
        for p in s.media():
            if p.type == "image":
                out.append(np.asarray(media.load_image(p.path)))
            else:
                out.append(media.load_audio(p.path))
    return out


def test_save_to_disk_chat_rows_are_the_jsonl_samples_with_the_same_token_counts(demo, tmp_path, tiny_qwen):
    from finetune.data.schema import load_samples

    fam, loaded = tiny_qwen
    folder = save_disk(chat_table(demo["train"]), tmp_path / "disk")
    got, errors = load(Source(path=str(folder)), tmp_path / "media")
    ref, _ = load_samples(demo["train"])
    assert errors == [] and len(got) == len(ref) == 16
    assert structure(got) == structure(ref)
    assert {s.task for s in got} >= {"audio", "multi", "text", "lesion"}  # every shape of the demo is covered
    for a, b in zip(media_content(got), media_content(ref)):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert [fam.count_tokens(s, loaded.processor) for s in got] == [fam.count_tokens(s, loaded.processor) for s in ref]
    assert all(str(p.path).startswith(str(tmp_path / "media")) for s in got for p in s.media())


def test_parquet_vqa_rows_are_the_equivalent_jsonl_samples(demo, tmp_path, tiny_qwen):
    from finetune.data.schema import load_samples

    fam, loaded = tiny_qwen
    rows, objs = vqa_table(demo["train"])
    parquet = save_vqa_parquet(rows, tmp_path / "vqa.parquet")
    assert isinstance(datasets.load_dataset("parquet", data_files=str(parquet), split="train").features["image"],
                      datasets.Image)
    got, errors = load(Source(path=str(parquet), columns={"image": "image", "question": "question",
                                                          "answer": "answer"}), tmp_path / "media")
    ref, _ = load_samples(write_jsonl(objs, demo["train"].parent / "vqa-equivalent.jsonl"))
    assert errors == [] and len(got) == len(ref) >= 12
    assert structure(got) == structure(ref)
    for a, b in zip(media_content(got), media_content(ref)):
        assert np.array_equal(a, b)
    assert [fam.count_tokens(s, loaded.processor) for s in got] == [fam.count_tokens(s, loaded.processor) for s in ref]


def test_embedded_media_are_written_once_and_not_decoded_again(demo, tmp_path, monkeypatch):
    from finetune.data import media

    folder = save_disk(chat_table(demo["train"]), tmp_path / "disk")
    first, _ = load(Source(path=str(folder)), tmp_path / "media")
    files = sorted((tmp_path / "media").iterdir())
    n_media = len({str(p.path) for s in first for p in s.media()})
    assert len(files) == n_media > 10  # one file per distinct image or recording, no temporary leftovers
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(media, "load_image", boom)
    monkeypatch.setattr(media, "load_audio", boom)
    second, errors = load(Source(path=str(folder)), tmp_path / "media")
    assert errors == [] and [str(p.path) for s in second for p in s.media()] == \
        [str(p.path) for s in first for p in s.media()]
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "media").iterdir())} == stamps


def _corrupt_parquet(demo, tmp_path, bad_row: int) -> Path:
    rows, _ = vqa_table(demo["train"])
    with_image = [i for i, r in enumerate(rows) if r["image"]]
    i = with_image[bad_row - 1]
    rows[i]["image"] = {"bytes": rows[i]["image"]["bytes"][:300], "path": None}  # a cut-off PNG
    return save_vqa_parquet([rows[k] for k in with_image], tmp_path / "broken.parquet")


def test_a_corrupt_embedded_image_is_named_by_its_row(demo, tmp_path):
    from finetune.data.schema import DataError

    parquet = _corrupt_parquet(demo, tmp_path, bad_row=3)
    with pytest.raises(DataError) as e:
        load(Source(path=str(parquet)), tmp_path / "media")
    assert e.value.line == 3 and e.value.file == str(parquet) and e.value.kind == "unreadable_image"
    assert "row 3" in str(e.value) and "column 'image'" in str(e.value) and "Fix:" in str(e.value)
    samples, errors = load(Source(path=str(parquet)), tmp_path / "media", on_error="skip")
    assert [x.line for x in errors] == [3] and len(samples) == len(datasets.Dataset.from_parquet(str(parquet))) - 1
    assert not any(".tmp-" in p.name for p in (tmp_path / "media").iterdir())  # nothing half-written kept


def test_data_check_reports_the_corrupt_row_of_a_parquet_file(demo, tmp_path, capsys):
    from finetune.cli import main

    parquet = _corrupt_parquet(demo, tmp_path, bad_row=2)
    assert main(["data", "check", str(parquet)]) == 1
    out = capsys.readouterr().out
    assert f"{parquet}:2: row 2: column 'image': the embedded image" in out
    n = len(datasets.Dataset.from_parquet(str(parquet)))
    assert f"checked 1 file: {n} samples, {n - 1} ok, 1 errors" in out


def test_data_check_with_a_recipe_counts_tokens_of_a_save_to_disk_folder(demo, tmp_path, capsys):
    from finetune.cli import main

    folder = save_disk(chat_table(demo["train"]), tmp_path / "disk")
    assert main(["data", "check", "--recipe", "medical-tiny", f"data.train={folder}", "data.eval=",
                 "data.demo=", "model.max_pixels=12544"]) == 0
    out = capsys.readouterr().out
    assert "checked 1 file: 16 samples, 16 ok, 0 errors" in out and "token lengths (n=16)" in out


def test_data_check_reads_a_recipe_source_with_its_column_mapping(demo, tmp_path, capsys):
    from finetune.cli import main

    rows, _ = vqa_table(demo["train"])
    renamed = [{"img": r["image"], "q": r["question"], "a": r["answer"]} for r in rows]
    parquet = tmp_path / "renamed.parquet"
    datasets.Dataset.from_list(renamed).cast_column("img", datasets.Image()).to_parquet(str(parquet))
    args = ["data", "check", "--recipe", "medical-tiny", "data.eval=", "data.demo=", "model.max_pixels=12544"]
    source = f"data.train=[{{path: {parquet}, columns: {{image: img, question: q, answer: a}}}}]"
    assert main(args + [source]) == 0
    out = capsys.readouterr().out
    assert f"checked 1 file: {len(rows)} samples, {len(rows)} ok, 0 errors" in out
    assert "image" in out.split("modality mix:")[1]  # the mapped image column was read
    assert main(args + [source.replace("q,", "question,")]) == 1
    assert "columns maps question: 'question', but the dataset has no such column; its columns: img, q, a" \
        in capsys.readouterr().out


def test_a_missing_column_is_named_with_the_datasets_columns_before_any_row(demo, tmp_path):
    from finetune.data.schema import DataError

    rows, _ = vqa_table(demo["train"])
    parquet = save_vqa_parquet(rows, tmp_path / "vqa.parquet")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as e:
            load(Source(path=str(parquet), columns={"question": "query", "answer": "answer"}), tmp_path / "m",
                 on_error=on_error)
        assert e.value.kind == "missing_column" and "'query'" in str(e.value)
        assert "its columns: id, task, system, question, answer, image, audio" in str(e.value)
    assert not (tmp_path / "m").exists()  # nothing was materialised: no row was read
    with pytest.raises(DataError, match="unknown field"):
        load(Source(path=str(parquet), columns={"picture": "image"}), tmp_path / "m")


def test_training_stops_on_a_missing_column_before_loading_the_model(demo, tmp_path, monkeypatch):
    from finetune.data.schema import DataError
    from finetune.families.qwen2_5_omni import Qwen25OmniFamily
    from finetune.train import train

    table = datasets.Dataset.from_list([{"q": "Is there a lesion?", "a": "No."}])
    table.to_parquet(str(tmp_path / "t.parquet"))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Qwen25OmniFamily, "load", no_load)
    with pytest.raises(DataError, match="no column for question and answer .* columns: q, a"):
        train(tiny_recipe(tmp_path, {"train": tmp_path / "t.parquet", "eval": ""}, "train.max_steps=1"))


def test_datasetdict_folder_reads_the_named_split(demo, tmp_path):
    from finetune.data.schema import DataError

    rows = chat_table(demo["train"])
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10]),
                               "test": datasets.Dataset.from_list(rows[10:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, _ = load(Source(path=str(tmp_path / "dd")), tmp_path / "m")
    test, _ = load(Source(path=str(tmp_path / "dd"), split="test"), tmp_path / "m")
    assert [s.id for s in train] == [r["id"] for r in rows[:10]]
    assert [s.id for s in test] == [r["id"] for r in rows[10:]] and test[0].source == f"{tmp_path / 'dd'}[test]"
    with pytest.raises(DataError, match="no split 'validation'; its splits: train, test"):
        load(Source(path=str(tmp_path / "dd"), split="validation"), tmp_path / "m")


def test_a_folder_of_parquet_files_in_hub_layout_and_a_glob(demo, tmp_path):
    rows = chat_table(demo["train"])
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:12]).to_parquet(str(tmp_path / "repo/data/train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[12:]).to_parquet(str(tmp_path / "repo/data/test-00000-of-00001.parquet"))
    train, _ = load(Source(path=str(tmp_path / "repo")), tmp_path / "m")
    test, _ = load(Source(path=str(tmp_path / "repo"), split="test"), tmp_path / "m")
    assert len(train) == 12 and [s.id for s in test] == [r["id"] for r in rows[12:]]
    both, _ = load(Source(path=str(tmp_path / "repo/data/*.parquet")), tmp_path / "m")
    assert sorted(s.id for s in both) == sorted(r["id"] for r in rows)


def test_audio_as_datasets_audio_bytes_float_arrays_and_their_errors(demo, tmp_path):
    from finetune.data import media
    from finetune.data.schema import DataError

    wav = next((demo["train"].parent / "audio").iterdir())
    ref = media.load_audio(wav)
    wave16 = sf.read(wav, dtype="int16")[0]
    stereo = np.stack([wave16, wave16]).astype(np.float32) / 32768  # (channels, samples)
    base = {"question": "Listen to the note and answer: is there a lesion?", "answer": "No."}
    table = datasets.Dataset.from_list([{**base, "audio": {"bytes": wav.read_bytes(), "path": None}}])
    table.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(tmp_path / "a.parquet"))
    (s,), _ = load(Source(path=str(tmp_path / "a.parquet")), tmp_path / "m")
    assert s.media()[0].path.suffix == ".wav" and np.array_equal(media.load_audio(s.media()[0].path), ref)

    rows = [{**base, "audio": {"array": stereo, "sampling_rate": 16000}},
            {**base, "audio": {"array": np.array([[0.0, np.nan]], dtype=np.float32), "sampling_rate": 16000}},
            {**base, "audio": {"array": stereo, "sampling_rate": 0}}]
    save_disk(rows, tmp_path / "arrays")
    samples, errors = load(Source(path=str(tmp_path / "arrays")), tmp_path / "m", on_error="skip")
    assert np.allclose(media.load_audio(samples[0].media()[0].path), ref, atol=1e-7)  # the two channels' mean
    assert [(e.line, e.kind) for e in errors] == [(2, "non_finite"), (3, "unreadable_audio")]
    assert "row 3: column 'audio'" in str(errors[1]) and "sampling_rate is 0" in str(errors[1])
    save_disk([{**base, "question": None}], tmp_path / "noq")
    with pytest.raises(DataError, match="row 1: column 'question': column 'question' is null"):
        load(Source(path=str(tmp_path / "noq")), tmp_path / "m")


def test_media_paths_of_a_table_stay_inside_its_folder(demo, tmp_path):
    from finetune.data.schema import DataError

    image = next((demo["train"].parent / "images").iterdir())
    rows = [{"image": "inside.png", "question": "Is there a lesion?", "answer": "No."},
            {"image": str(image), "question": "Is there a lesion?", "answer": "No."}]
    save_disk(rows, tmp_path / "t" / "paths")
    src = Source(path=str(tmp_path / "t" / "paths"))
    # a relative path resolves against the dataset's folder (the save_to_disk folder here)
    (tmp_path / "t" / "paths" / "inside.png").write_bytes(image.read_bytes())
    samples, errors = load(src, tmp_path / "m", on_error="skip")
    assert samples[0].media()[0].path == (tmp_path / "t" / "paths" / "inside.png").resolve()
    assert [(e.line, e.kind) for e in errors] == [(2, "outside_path")]
    with pytest.raises(DataError, match="outside the dataset folder"):
        load(src, tmp_path / "m")
    samples, errors = load(src, tmp_path / "m", allow_outside_paths=True)
    assert len(samples) == 2 and samples[1].media()[0].path == image.resolve()


def test_load_source_dispatches_on_the_format(demo, tmp_path):
    from finetune.data.sources import load_source, source_format
    from finetune.errors import ConfigError, MissingFileError
    from finetune.recipe import load_recipe

    recipe = load_recipe("medical-tiny")
    folder = save_disk(chat_table(demo["train"]), tmp_path / "disk")
    assert source_format(str(demo["train"])) == "jsonl" and source_format(str(folder)) == "hf"
    assert source_format(Source(hub="acme/set")) == "hf" and source_format(str(tmp_path / "x.parquet")) == "hf"
    jsonl, _ = load_source(str(demo["train"]), recipe)
    table, _ = load_source(Source(path=str(folder)), recipe)
    assert structure(jsonl) == structure(table)
    with pytest.raises(MissingFileError, match="does not exist"):
        load_source(str(tmp_path / "nope.parquet"), recipe)
    with pytest.raises(ConfigError, match="path .* or hub .* not both"):
        load_source(Source(path=str(folder), hub="acme/set"), recipe)
    with pytest.raises(ConfigError, match="format jsonl reads a local file"):
        load_source(Source(hub="acme/set", format="jsonl"), recipe)


def _losses(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("num_tokens")) for r in recs if "loss" in r}


@pytest.mark.slow
def test_tables_train_as_the_equivalent_jsonl_first_step_loss(demo, tmp_path):
    """medical-tiny for 1 step on a save_to_disk folder and on a Parquet file gives the loss (and
    the token count) of the same samples as JSONL."""
    from finetune.train import train

    folder = save_disk(chat_table(demo["train"]), tmp_path / "disk")
    rows, objs = vqa_table(demo["train"])
    parquet = save_vqa_parquet(rows, tmp_path / "vqa.parquet")
    vqa_jsonl = write_jsonl(objs, demo["train"].parent / "vqa-equivalent.jsonl")
    runs = {}
    for name, train_src in (("jsonl", demo["train"]), ("disk", folder), ("vqa-jsonl", vqa_jsonl),
                            ("parquet", parquet)):
        split = {"train": train_src, "eval": demo["eval"]}
        # one step over every packed row: the loss covers every sample
        runs[name] = _losses(train(tiny_recipe(tmp_path / name, split, "train.max_steps=1", "train.batch_size=16")))
    print({k: v[1] for k, v in runs.items()})
    assert runs["disk"][1][0] == pytest.approx(runs["jsonl"][1][0], abs=1e-6)
    assert runs["parquet"][1][0] == pytest.approx(runs["vqa-jsonl"][1][0], abs=1e-6)
    assert runs["disk"][1][1] == runs["jsonl"][1][1] and runs["parquet"][1][1] == runs["vqa-jsonl"][1][1]
    assert runs["jsonl"][1][0] != runs["vqa-jsonl"][1][0]  # the two pairs are different data


def test_parquet_and_saved_rows_with_chosen_and_rejected_columns_are_pairs(demo, tmp_path):
    """Preference rows (issue 29): VQA rows whose answer columns are chosen and rejected (an image
    embedded in the row), and chat rows whose messages are the prompt, with the image and audio
    from their columns: each becomes the pair its JSONL would be; a row without its rejected
    answer is named by its row."""
    from finetune.data.check import check_dataset

    rows, _ = vqa_table(demo["train"])
    rows = [{**{k: v for k, v in r.items() if k != "answer"}, "chosen": r["answer"], "rejected": "I cannot tell."}
            for r in rows]
    parquet = save_vqa_parquet(rows, tmp_path / "pairs.parquet")
    got, errors = load(Source(path=str(parquet)), tmp_path / "media")
    assert errors == [] and len(got) == len(rows) and all(s.is_preference for s in got)
    assert got[0].messages[-1].text() == rows[0]["chosen"] and got[0].rejected.text() == "I cannot tell."
    assert got[0].messages[-2].role == "user" and any(p.type == "image" for p in got[0].messages[-2].parts)

    chats = [dict(r, messages=r["messages"][:-1], chosen=r["messages"][-1]["content"][0]["text"], rejected="No idea.")
             for r in chat_table(demo["train"]) if r["messages"][-1]["role"] == "assistant"]
    folder = save_disk(chats, tmp_path / "saved")
    got, errors = load(Source(path=str(folder)), tmp_path / "media")
    assert errors == [] and len(got) == len(chats) and all(s.is_preference for s in got)
    assert {p.type for s in got for p in s.media()} >= {"image", "audio"}

    broken = save_vqa_parquet([dict(rows[0], rejected=None), rows[1]], tmp_path / "broken.parquet")
    report = check_dataset([broken])
    assert [e.line for e in report.errors] == [1] and "rejected" in str(report.errors[0]), report.format()
