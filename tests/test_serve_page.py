"""`python -m finetune serve` as a user meets it: the real CLI serves a tiny run on a loopback port
and headless Chromium, driven through the DevTools protocol, uploads a demo scan, asks, and reads
the base and tuned answers off the page; the screenshot shows them; the Training and Evaluation
tabs show the run's loss, eval.html and predictions; nothing leaves the machine
(Chromium and the server both go through a proxy that records every request not to 127.0.0.1);
the upload folder is removed when serve stops."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import DevTools, RecordingProxy, chromium
from conftest import ROOT

QUESTION = "Is there a lesion?"
SIZE = (1280, 1000)
# the page's textboxes by their labels, and the Ask button (finetune/serve.py's page)
JS_HELPERS = """
window._box = (label) => [...document.querySelectorAll('label')]
    .find(l => l.innerText.trim() === label)?.querySelector('textarea');
window._ask = () => document.getElementById('ask');
window._tab = (name) => [...document.querySelectorAll('button[role=tab]')].find(b => b.innerText.trim() === name);
true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"serve exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with direct.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"serve did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def expected(tiny_runs, small_demo):
    """The run, a demo scan and the one-shot base and tuned answers to QUESTION about it."""
    from finetune.chat import answer_once
    from finetune.inference import open_model

    run = tiny_runs("qwen2_5_omni")
    image = sorted((small_demo["eval"].parent / "images").iterdir())[0]
    assistant = open_model(str(run), device="cpu")
    answers = tuple(answer_once(assistant, QUESTION, [("image", image)], tuned=t) for t in (False, True))
    assert answers[0] != answers[1] and all(a.strip() for a in answers)
    return run, image, answers


@pytest.mark.slow
def test_the_page_answers_base_and_tuned_side_by_side_and_loads_nothing_from_outside(expected, tmp_path):
    binary = chromium()
    trained, image, (want_base, want_tuned) = expected
    run = tmp_path / "run"  # a copy that has been evaluated (a page and predictions of our own)
    shutil.copytree(trained, run)
    (run / "eval.html").write_text("<!DOCTYPE html><title>eval</title><p id=mark>EVAL PAGE 7f3a</p>")
    (run / "predictions.jsonl").write_text(json.dumps({"id": "eval-0000", "base": "no", "tuned": "yes"}) + "\n")
    proxy = RecordingProxy()
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    tmp = tmp_path / "tmp"  # the server's temporary folder: the upload folder is made in it
    tmp.mkdir()
    via_proxy = f"http://127.0.0.1:{proxy.port}"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
           # serve turns Gradio's telemetry off itself, whatever the environment says
           "GRADIO_ANALYTICS_ENABLED": "True",
           **{k: via_proxy for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(run), "--port", str(port),
                                   "--device", "cpu"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  # Ctrl-C reaches serve even when this suite runs as a background job, whose
                                  # commands inherit SIGINT ignored (CI launched with `&` hung here 90 s)
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    browser = None
    try:
        _wait_until_served(origin + "/", server, log)
        [upload_dir] = tmp.glob("finetune-serve-*")
        # every request the page makes that does not go to loopback goes to the recording proxy
        browser = DevTools(binary, tmp_path / "profile", f"--proxy-server=127.0.0.1:{proxy.port}")
        browser.call("Network.enable")
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1], deviceScaleFactor=1,
                     mobile=False)
        browser.call("Page.navigate", url=origin + "/")
        browser.wait_for("!!(document.querySelector('input[type=file]') && document.getElementById('ask'))", 30,
                         "the page to render")
        browser.js(JS_HELPERS)
        assert browser.js("!!(_box('question') && _box('base (adapter off)') && _box('tuned (adapter on)') && _ask())")

        # upload the scan into the image field, as choosing it in the file dialog does
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        field = browser.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=field, files=[str(image)])
        browser.wait_for(f"document.body.innerText.includes({image.name!r})", 30, "the upload to show")
        # in our upload folder, and nowhere else in the server's temporary folder (Gradio writes a
        # temporary name first, then moves it to a folder named by its hash)
        deadline = time.monotonic() + 30
        while [p.name for p in tmp.rglob("*") if p.is_file()] != [image.name] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p.relative_to(upload_dir).parts[-1] for p in tmp.rglob("*") if p.is_file()] == [image.name], \
            sorted(map(str, tmp.rglob("*")))

        # type the question and press Ask
        browser.js("_box('question').focus()")
        browser.call("Input.insertText", text=QUESTION)
        browser.js("_ask().click()")
        deadline = time.monotonic() + 60
        while True:
            base, tuned = browser.js("[_box('base (adapter off)').value, _box('tuned (adapter on)').value]")
            if tuned == want_tuned or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert (base, tuned) == (want_base, want_tuned), \
            f"the page shows base {base!r}, tuned {tuned!r}:\n{browser.js('document.body.innerText')[:3000]}"

        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(shot)
        boxes = browser.js("""['question', 'base (adapter off)', 'tuned (adapter on)'].map(l => {
            const r = _box(l).getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })""")
        dom = browser.js("document.documentElement.outerHTML")
        title, font = browser.js("[document.title, getComputedStyle(_box('tuned (adapter on)')).fontFamily]")

        # the run's training (metrics.jsonl) and evaluation (eval.html in a frame, predictions)
        browser.js("_tab('Training').click()")
        browser.wait_for("/step 3, loss \\d/.test(document.body.innerText)", 20, "the training progress")
        browser.js("_tab('Evaluation').click()")
        browser.wait_for("document.querySelector('iframe')?.contentDocument?.getElementById('mark')?.innerText",
                         20, "eval.html in its frame")
        browser.wait_for("document.body.innerText.includes('eval-0000')", 20, "the predictions table")
        probe_from = len(browser.events)
        seen_by_proxy = list(proxy.page_requests())
        # the recording works: a request to an outside host is seen by both the proxy and the page's log
        browser.js("fetch('http://example.invalid/probe').then(() => 1, () => 0)")
    finally:
        if browser is not None:
            browser.close()
        server.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops serve
        stopping = time.monotonic()
        try:
            # measured: 2.5 s on an idle machine
            server.wait(timeout=90)
            print(f"serve stopped {time.monotonic() - stopping:.1f} s after Ctrl-C")
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        proxy.close()

    # nothing but loopback: the page's own requests (DevTools log) and whatever reached the proxy
    # (Chromium's and the server's: telemetry, version checks, fonts, CDNs)
    urls = [e["params"].get("request", e["params"]).get("url", "") for e in browser.events[:probe_from]
            if e["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated")]
    assert any(u.startswith(origin + "/gradio_api/upload") for u in urls), urls
    assert any(u.startswith(origin + "/gradio_api/file=") and u.endswith("eval.html") for u in urls), urls
    outside = [u for u in urls if not u.startswith((origin + "/", "data:", "blob:"))]
    assert outside == [] and seen_by_proxy == [], (outside, seen_by_proxy)
    probe = [e for e in browser.events[probe_from:] if e["method"] == "Network.requestWillBeSent"]
    assert any("example.invalid" in e["params"]["request"]["url"] for e in probe)
    assert any("example.invalid" in r for r in proxy.page_requests()), proxy.requests

    # the screenshot: the page drawn (not blank), each answer's box holds drawn text
    px = np.asarray(Image.open(io.BytesIO(shot)).convert("L")).astype(int)
    assert px.shape == (SIZE[1], SIZE[0]) and len(np.unique(px)) > 20
    for left, top, right, bottom in boxes:
        assert 0 <= top < bottom <= SIZE[1], "a textbox is off screen"
        inside = px[int(top) + 4:int(bottom) - 4, int(left) + 4:int(right) - 4]
        assert (inside < 128).sum() > 30, "no text drawn in a textbox"
    assert title == "omni-finetune" and "Qwen2.5-Omni" in dom
    assert font.startswith("system-ui") and "fonts.googleapis" not in dom  # the theme's system fonts

    # Ctrl-C stopped serve, and the upload folder went with it
    assert server.returncode is not None and not upload_dir.exists(), log.read_text()[-2000:]
