"""`python -m finetune serve`: the page's logic without the page (tests/test_serve_page.py drives
the page in Chromium): base and tuned answers streamed side by side, uploads checked as dataset
media inside one temporary folder, the run's training read live, the address and its warning."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from finetune import serve as srv
from finetune.chat import answer_once
from finetune.cli import main
from finetune.errors import UserError

QUESTION = "Is there a lesion?"


@pytest.fixture(scope="module")
def assistant(tiny_runs):
    from finetune.inference import open_model

    return open_model(str(tiny_runs("qwen2_5_omni")), device="cpu")


@pytest.fixture
def uploads():
    u = srv.Uploads()
    yield u
    u.close()


def _upload(small_demo, uploads, kind="image"):
    src = sorted((small_demo["eval"].parent / ("images" if kind == "image" else "audio")).iterdir())[0]
    dst = uploads.dir / src.name
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.slow
def test_compare_streams_base_then_tuned_and_ends_on_the_one_shot_answers(assistant, small_demo, uploads):
    image = srv.check_upload(assistant, "image", _upload(small_demo, uploads), uploads=uploads, max_bytes=10 << 20)
    steps = list(srv.compare(assistant, QUESTION, [("image", image)]))
    base, tuned = steps[-1]
    assert base == answer_once(assistant, QUESTION, [("image", image)], tuned=False)
    assert tuned == answer_once(assistant, QUESTION, [("image", image)], tuned=True)
    assert base != tuned
    # streamed: the base's text grows while the tuned column is empty, then the tuned one grows
    first_tuned = next(i for i, (_, t) in enumerate(steps) if t)
    assert first_tuned >= 2 and all(t == "" for _, t in steps[:first_tuned])
    for (b0, t0), (b1, t1) in zip(steps, steps[1:]):
        assert b1.strip().startswith(b0.strip()) or b1 == base
        assert t1.strip().startswith(t0.strip())


@pytest.mark.slow
def test_uploads_are_checked_like_dataset_media(assistant, small_demo, uploads, tmp_path):
    good = _upload(small_demo, uploads)
    assert srv.check_upload(assistant, "image", good, uploads=uploads, max_bytes=10 << 20) == good
    with pytest.raises(srv.UploadError, match="over the 0 MB upload cap"):
        srv.check_upload(assistant, "image", good, uploads=uploads, max_bytes=100)
    outside = tmp_path / good.name
    shutil.copyfile(good, outside)
    with pytest.raises(srv.UploadError, match="not an upload of this page"):
        srv.check_upload(assistant, "image", outside, uploads=uploads, max_bytes=10 << 20)
    fake = uploads.dir / "scan.png"
    fake.write_text("not an image")
    with pytest.raises(UserError, match="cannot decode image .*scan.png"):
        srv.check_upload(assistant, "image", fake, uploads=uploads, max_bytes=10 << 20)
    with pytest.raises(UserError, match="cannot read audio header .*eval-"):  # an image given as audio
        srv.check_upload(assistant, "audio", good, uploads=uploads, max_bytes=10 << 20)
    with pytest.raises(UserError, match="ask a question"):
        list(srv.compare(assistant, "", []))  # nothing asked
    folder = uploads.dir
    uploads.close()
    assert not folder.exists()


def test_the_upload_folder_is_a_new_temporary_folder():
    u = srv.Uploads()
    try:
        assert u.dir.parent == Path(tempfile.gettempdir()).resolve() and not any(u.dir.iterdir())
        assert not u.holds(u.dir.parent / "x") and u.holds(u.dir / "x")
        (u.dir / "link").symlink_to("/etc/hostname")
        assert not u.holds(u.dir / "link")  # a link out of the folder is not an upload
    finally:
        u.close()


def test_training_progress_is_read_live(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert srv.training_progress(run)["text"].endswith("no training steps logged yet")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "loss": 2.5}) + "\n")
        f.flush()
        p = srv.training_progress(run)
        assert p["curve"] == [{"step": 1, "loss": 2.5}] and not p["trained"]
        f.write(json.dumps({"step": 2, "loss": 2.0}) + "\n")
        f.write(json.dumps({"eval_loss": 1.0, "step": 2}) + "\n")  # not a training loss: not on the curve
        f.flush()
    p = srv.training_progress(run)
    assert p["curve"] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}] and p["text"] == "step 2, loss 2.0000"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert srv.training_progress(run)["trained"]
    assert srv.training_progress(None)["curve"] == []


def test_predictions_are_read_bounded(tmp_path):
    assert srv.predictions(tmp_path) == [] and srv.eval_page(tmp_path) is None
    lines = [json.dumps({"id": i, "tuned": "yes"}) for i in range(10)]
    lines[3] = "not json"
    lines[4] = json.dumps({"id": 4, "big": "x" * (2 << 20)})
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["id"] for r in srv.predictions(tmp_path)] == [0, 1, 2, 5, 6, 7, 8, 9]
    assert [r["id"] for r in srv.predictions(tmp_path, limit=2)] == [0, 1]


@pytest.mark.parametrize("host,local", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.1.1", True),
                                        ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("myhost", False)])
def test_only_loopback_addresses_count_as_local(host, local):
    assert srv.is_loopback(host) is local


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serve_binds_where_asked_warns_when_exposed_and_leaves_no_upload_folder(monkeypatch, capsys, host, warned):
    """serve() with the page stubbed: the address given to the server, the warning, the app-level
    settings (Gradio 6 takes the theme in launch()), Gradio's upload folder pointed at ours and
    removed after."""
    seen = {}

    class Page:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            seen.update(kw, temp=os.environ["GRADIO_TEMP_DIR"])
            assert Path(seen["temp"]).is_dir()

    class Stub:
        run_dir = None

    monkeypatch.setattr(srv, "require_gradio", lambda: None)
    monkeypatch.setattr(srv, "page", lambda a, uploads, max_bytes: (Page(), {"theme": "system fonts"}))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    assert srv.serve(Stub(), host=host, port=0, max_upload_mb=1) == 0
    assert seen["server_name"] == host and seen["share"] is False and seen["max_file_size"] == 1_000_000
    assert seen["theme"] == "system fonts" and "api" not in seen["footer_links"] and seen["run_history"] is False
    assert not Path(seen["temp"]).exists()
    err = capsys.readouterr().err
    assert ("medical data" in err) is warned


def test_serve_without_gradio_names_the_extra_before_loading_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # an environment without the extra: import fails
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert main(["serve", str(tmp_path / "no-such-run")]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


def test_an_export_answers_alone_on_the_right_and_says_why():
    """An export folder (no adapter: the tuned model merged) streams its answer on the right; the
    left says the base answers where the run folder is served. The labels come from the assistant."""
    class Export:
        has_adapter, own, label = False, "merged", "runs/x/merged"

        def sample(self, history, question, attachments):
            return question

        def stream(self, sample, *, tuned):
            assert tuned is False  # no adapter to switch on: the merged weights answer
            yield "Yes"
            yield "Yes."

    steps = list(srv.compare(Export(), QUESTION))
    assert steps[-1][1] == "Yes." and "tuned model merged" in steps[-1][0] and steps[0][1] == ""
