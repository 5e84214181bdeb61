"""eval.html opened in headless Chromium: the metrics table and a thumbnail are on screen, the
filters work, and the page makes no network request (every request Chromium makes goes to a
recording proxy; only Chromium's own service calls may appear there)."""

import base64
import io
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from browser import QUIET_FLAGS, RecordingProxy
from browser import chromium as _chromium
from finetune.data.schema import parse_sample
from finetune.evaluate import compare, plan_metrics, score
from finetune.report import THUMB_PX, figure_rows, loss_svg, pick_examples, write_html

THUMB_RGB = (230, 20, 160)      # the lesion image's colour: nothing else on the page has it
HEADER_RGB = (0x1F, 0x4E, 0x79)  # the metrics table's header cells (report.py's CSS)


def _run(chromium, proxy, tmp, url, *args):
    prof = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    cmd = [chromium, *QUIET_FLAGS, f"--user-data-dir={prof}", f"--proxy-server=127.0.0.1:{proxy.port}",
           "--proxy-bypass-list=<-loopback>", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    Image.new("RGB", (144, 96), THUMB_RGB).save(tmp / "lesion.png")
    Image.new("RGB", (64, 64), (40, 160, 60)).save(tmp / "scan.png")
    t = np.arange(16000) / 16000
    sf.write(tmp / "note.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000, subtype="PCM_16")

    def sample(line, parts, question, reply, **top):
        content = [{"type": k, "path": p} for k, p in parts] + [{"type": "text", "text": question}]
        return parse_sample({"id": f"s{line}", "messages": [{"role": "user", "content": content},
                                                            {"role": "assistant", "content": reply}], **top},
                            source=str(tmp / "eval.jsonl"), line=line, base_dir=tmp)

    samples = [
        sample(1, [("image", "lesion.png")], "Is there a lesion?", "Yes.", answer="yes", task="lesion"),
        sample(2, [("image", "scan.png"), ("audio", "note.wav")], "Listen: is there a lesion?", "No.",
               answer="no", task="audio"),
        sample(3, [("image", "scan.png")], "Which scan? A) Chest X-ray B) Fundus photograph", "A",
               options=["Chest X-ray", "Fundus photograph"], task="modality"),
        sample(4, [], "What does CT stand for?", "Computed tomography.", task="text"),
    ]
    preds = {"base": ["No.", "Yes, there is.", "B", "computed tomography"],
             "tuned": ["Yes, a round one.", "No.", "A", "computed tomography"]}
    plans = plan_metrics(samples)
    res = {"recipe": "report-test", "eval_file": str(tmp / "eval.jsonl"), "n_samples": 4, "metric": "auto",
           "bootstrap": 200}
    for name, p in preds.items():
        res[name] = {**score(samples, p, plans=plans, n_resamples=200), "token_loss": 1.0}
    res["paired"] = compare(samples, res["base"], res["tuned"])
    res["samples"] = [{"id": s.id, "reference": pl["reference"]} for s, pl in zip(samples, plans)]
    history = [{"step": i, "loss": 3.0 * 0.95 ** i} for i in range(1, 51)]
    path = write_html(res, samples, preds, history, tmp / "eval.html")
    return {"path": path, "html": path.read_text(), "results": res, "tmp": tmp, "samples": samples, "preds": preds}


def test_the_page_is_self_contained(page):
    html = page["html"]
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I), "an external URL in eval.html"
    srcs = re.findall(r'\s(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "data:audio/wav;base64,"))
                        for s in srcs), srcs
    assert "<link" not in html and "@import" not in html
    # one thumbnail per image part (samples 1, 2, 3), at most THUMB_PX, with the image's own colour
    thumbs = [s for s in srcs if s.startswith("data:image/")]
    assert len(thumbs) == 3
    im = Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))).convert("RGB")
    assert im.size == (THUMB_PX, THUMB_PX * 2 // 3) and im.getpixel((10, 10)) == THUMB_RGB
    wavs = [s for s in srcs if s.startswith("data:audio/wav")]
    assert len(wavs) == 1 and html.count("<audio controls") == 1
    wave, sr = sf.read(io.BytesIO(base64.b64decode(wavs[0].split(",", 1)[1])))
    assert sr == 16000 and len(wave) == 16000
    assert len(html) < 200_000


def test_examples_are_marked_and_tagged(page):
    html = page["html"]
    # base wrong -> tuned right on samples 1, 2 (yesno) and 3 (choice); sample 4 right in both
    assert html.count('data-change="fixed"') == 3 and html.count('data-change="unchanged"') == 1
    assert html.count('class="ans ok"') == 5 and html.count('class="ans bad"') == 3
    assert 'data-task="lesion"' in html and "Is there a lesion?" in html


def test_chromium_shows_the_table_and_a_thumbnail_without_network(page):
    chromium = _chromium()
    proxy = RecordingProxy()
    try:
        url = page["path"].as_uri()
        dom = _run(chromium, proxy, page["tmp"], url, "--virtual-time-budget=2000", "--dump-dom")
        shot = page["tmp"] / "shot.png"
        _run(chromium, proxy, page["tmp"], url, f"--screenshot={shot}", "--window-size=1280,1400")
        filtered = _run(chromium, proxy, page["tmp"], url + "#change=unchanged", "--virtual-time-budget=2000",
                        "--dump-dom")
        assert proxy.page_requests() == [], proxy.requests
        # the recording works: a page with one external image is seen asking for it
        probe = page["tmp"] / "probe.html"
        probe.write_text('<!DOCTYPE html><img src="http://example.invalid/pixel.png">')
        _run(chromium, proxy, page["tmp"], probe.as_uri(), "--virtual-time-budget=2000", "--dump-dom")
        assert any("example.invalid" in r for r in proxy.page_requests()), proxy.requests
    finally:
        proxy.close()

    rows = re.findall(r'<tr class="(\w+)"><td>([^<]*)</td>', dom)
    assert len(rows) == len(figure_rows(page["results"]))
    labels = [label for _, label in rows]
    assert any(x.startswith("score (") for x in labels) and "task lesion (yesno)" in labels
    assert "modality audio" in labels and "exact-match accuracy" in labels
    assert "showing 4 of 4" in dom                              # the script ran
    assert re.search(r'<polyline points="([\d.]+,[\d.]+ ){49}[\d.]+,[\d.]+"', dom)  # 50 loss points
    # the filter from the address hides the three fixed items
    assert "showing 1 of 4" in filtered
    assert len(re.findall(r'class="card" data-task="\w+" data-change="fixed" style="display: none;"', filtered)) == 3

    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def area(rgb, tol=6):
        return int((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).sum())

    assert area(THUMB_RGB) >= 0.9 * THUMB_PX * (THUMB_PX * 2 // 3), "the lesion thumbnail is not on screen"
    assert area(HEADER_RGB) >= 3000, "the metrics table's header is not on screen"


def test_loss_svg_and_example_choice():
    assert loss_svg([]) == ""
    svg = loss_svg([{"step": 1, "loss": 2.0, "stage": "align"}, {"step": 2, "loss": 1.0, "stage": "align"},
                    {"step": 3, "loss": 0.5, "stage": "sft"}])
    assert svg.count('class="stage"') == 2 and "<polyline" in svg
    # fixed/broken first, then unchanged ones in turn per task, back in the original order
    changes = ["unchanged", "fixed", "unchanged", "unchanged", "broken", "unchanged"]
    tasks = ["a", "a", "a", "b", "b", "b"]
    assert pick_examples(changes, tasks, 4) == [0, 1, 3, 4]
    assert pick_examples(changes, tasks, 1) == [1]


def test_a_page_without_the_base_model(page):
    """eval.compare_base: false -> no base column, no change filter, every item 'tuned only'."""
    res = {k: v for k, v in page["results"].items() if k not in ("base", "paired")}
    path = write_html(res, page["samples"], {"tuned": page["preds"]["tuned"]}, [], page["tmp"] / "tuned.html")
    html = path.read_text()
    assert "<th>base</th>" not in html and "<th>change</th>" not in html
    assert html.count('data-change="tuned only"') == 4 and 'value="fixed"' not in html
    assert "no training loss records" in html


# ---- what the page holds: a banner, media only when asked, no absolute path --------------------
def test_the_page_opens_with_a_banner_that_it_holds_data(page):
    html = page["html"]
    banner = re.search(r'<div class="banner" role="note">(.*?)</div>', html, re.S)
    assert banner, "no data banner"
    assert html.index('class="banner"') < html.index("<h1>"), "the banner is not the first thing on the page"
    text = banner.group(1)
    for word in ("data samples", "images", "audio", "questions", "answers", "share"):
        assert word in text, word
    assert ".banner{" in html  # styled to stand out, not hidden


def test_report_media_false_leaves_the_media_out(page):
    res = page["results"]
    path = write_html(res, page["samples"], page["preds"], [], page["tmp"] / "nomedia.html", media=False)
    html = path.read_text()
    assert "data:image/" not in html and "data:audio/" not in html and "<audio" not in html and "<img" not in html
    assert "eval.report_media: false" in html  # the page says why there are none
    assert "Is there a lesion?" in html and html.count('class="card"') == 4  # the items are still there
    banner = re.search(r'<div class="banner" role="note">(.*?)</div>', html, re.S).group(1)
    assert "questions" in banner and "images" not in banner


def _untagged_page(tmp, name, **kw):
    """A page of two samples without id or task, the eval file and a missing image given by absolute path."""
    def sample(line, parts):
        content = [{"type": "image", "path": p} for p in parts] + [{"type": "text", "text": f"Question {line}?"}]
        return parse_sample({"messages": [{"role": "user", "content": content},
                                          {"role": "assistant", "content": "Yes."}], "answer": "yes"},
                            source=str(tmp / "private" / "eval.jsonl"), line=line, base_dir=tmp,
                            check_files=False)

    samples = [sample(3, ["lesion.png"]), sample(5, ["gone/missing.png"])]
    preds = {"base": ["no", "no"], "tuned": ["yes", "no"]}
    plans = plan_metrics(samples)
    res = {"recipe": "r", "eval_file": str(tmp / "private" / "eval.jsonl"), "n_samples": 2, "metric": "auto",
           "bootstrap": 0}
    for n, p in preds.items():
        res[n] = {**score(samples, p, plans=plans, n_resamples=0), "token_loss": 1.0}
    res["general"] = {"file": str(tmp / "private" / "general.jsonl"), "n_samples": 2, "base": res["base"],
                      "tuned": res["tuned"]}
    return write_html(res, samples, preds, [], tmp / name, **kw).read_text()


def test_the_page_names_files_without_their_folders(page):
    tmp = page["tmp"]
    for html in (page["html"], _untagged_page(tmp, "untagged.html")):
        assert str(tmp) not in html, re.findall(re.escape(str(tmp)) + r"[^\s<\"]*", html)[:5]
    html = _untagged_page(tmp, "untagged2.html")
    assert "eval.jsonl:3" in html and "eval.jsonl:5" in html and "missing.png" in html


def test_the_task_filter_lists_all_once():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        Image.new("RGB", (32, 32), THUMB_RGB).save(Path(d) / "lesion.png")
        html = _untagged_page(Path(d), "t.html")
    select = re.search(r'<select id="f-task">(.*?)</select>', html, re.S).group(1)
    labels = re.findall(r"<option[^>]*>([^<]*)</option>", select)
    assert labels.count("all") == 1, labels
    assert len(labels) == 2 and "None" not in html  # 'all' and the label of samples without a task
