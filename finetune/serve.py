"""`python -m finetune serve TARGET`: a local web page to try a run's model (layer 6).

Upload an image, audio clip or video, ask, and the base (adapter off) and tuned (adapter on)
answers appear side by side, streamed; one model is in memory, so they are generated one after
the other. The page also shows the run's evaluation (eval.html, predictions.jsonl) and a
running training's progress (metrics.jsonl, read again every few seconds).

The page is Gradio 6's (the `serve` extra, in `make install`): the UI library LLaMA-Factory's
LlamaBoard and ms-swift's web-ui users know, kept up by Hugging Face, with file upload, streaming
and plots built in. It binds 127.0.0.1 unless --host says otherwise (then a warning: the data the
page shows goes to whoever reaches it). It loads nothing from outside the machine: system fonts,
no telemetry, no version check, no run history kept in the browser (tests/test_serve_page.py
drives it in headless Chromium behind a proxy that records any other request). Every upload
lands in one temporary folder of ours (Gradio's upload folder is pointed there) and is removed
with it; each is checked as a dataset's media are before the model sees it: a size cap, then the
recipe's data.max_* caps and the decoders (Assistant.sample).

Everything but the page itself (`page`) is plain functions, tested without Gradio.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from finetune.data.schema import MEDIA_TYPES
from finetune.errors import ConfigError, MissingExtraError, UserError
from finetune.fsutil import private_temp_dir
from finetune.inference import Assistant
from finetune.runfolder import read_loss_history

#: what `serve` prints before it binds an address other machines can reach
EXPOSED_WARNING = ("warning: serving on {host}: anyone who can reach this address can upload files to the model and "
                   "read the run's evaluation page and predictions, which may hold medical data; serve on "
                   "127.0.0.1 (the default) unless this network is meant to see them")

#: the most rows of predictions.jsonl the page shows (the file is read no further)
MAX_PREDICTION_ROWS = 500
_MAX_LINE_BYTES = 1 << 20


class UploadError(UserError, ValueError):
    """An uploaded file the page refuses: its name, the reason and what to do instead."""


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Uploads:
    """The one folder uploads are written to: a new temporary folder, removed by `close`."""

    def __init__(self) -> None:
        self.dir = private_temp_dir("finetune-serve-")

    def holds(self, path: str | Path) -> bool:
        """Whether `path` is a file inside this folder (links resolved)."""
        try:
            Path(path).resolve().relative_to(self.dir)
            return True
        except ValueError:
            return False

    def close(self) -> None:
        """Remove the folder and every upload in it."""
        shutil.rmtree(self.dir, ignore_errors=True)


def check_upload(assistant: Assistant, kind: str, path: str | Path, *, uploads: Uploads, max_bytes: int) -> Path:
    """An uploaded file, checked before the model sees it: inside the upload folder, a regular file
    of at most `max_bytes`, of a kind the model takes, decoded under the recipe's data.max_* caps
    as a dataset's media are. Raises UploadError (or the DataError naming the problem)."""
    p = Path(path)
    if kind not in MEDIA_TYPES:
        raise ConfigError(f"unknown attachment kind {kind!r}; use one of {', '.join(MEDIA_TYPES)}")
    if not uploads.holds(p):
        raise UploadError(f"{p.name}: not an upload of this page (only files uploaded here are read)")
    if not p.is_file():
        raise UploadError(f"{p.name}: not a regular file; upload the {kind} file itself")
    size = p.stat().st_size
    if size > max_bytes:
        raise UploadError(f"{p.name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB upload cap; "
                          f"upload a smaller {kind}, or start serve with a higher --max-upload-mb")
    assistant.sample([], "", [(kind, p)])  # modality, caps and decoders: a bad file raises its DataError
    return p


def compare(assistant: Assistant, question: str, attachments=()) -> Iterator[tuple[str, str]]:
    """(base answer so far, tuned answer so far), streamed: the base's first (adapter off), then the
    tuned model's. Without an adapter (an export folder) the model's answer is the second and the
    first says why it is alone. The question is checked first (a bad file raises before any answer)."""
    sample = assistant.sample([], question, attachments)
    base = ""
    if assistant.has_adapter:
        for base in assistant.stream(sample, tuned=False):
            yield base, ""
    else:
        base = (f"({assistant.label} is the tuned model merged: the base answers where its run folder is served)"
                if assistant.own == "merged" else
                f"({assistant.label} has no adapter: the answer on the right is the model's own)")
        yield base, ""
    for tuned in assistant.stream(sample, tuned=assistant.has_adapter):
        yield base, tuned


def training_progress(run_dir: Path | None) -> dict:
    """The run's training so far from its metrics.jsonl (read again on each call): the loss curve
    as [{step, loss}], the last record and whether the adapter is written yet."""
    if run_dir is None:
        return {"curve": [], "last": None, "trained": False, "text": "an export folder: no training to show"}
    records = read_loss_history(run_dir)
    curve = [{"step": r["step"], "loss": r["loss"], **({"stage": r["stage"]} if "stage" in r else {})}
             for r in records]
    trained = (Path(run_dir) / "adapter" / "adapter_config.json").is_file()
    last = records[-1] if records else None
    if last is None:
        text = f"{run_dir}: no training steps logged yet"
    else:
        text = f"step {last['step']}, loss {last['loss']:.4f}" + ("; the adapter is written" if trained else "")
    return {"curve": curve, "last": last, "trained": trained, "text": text}


def predictions(run_dir: Path | None, limit: int = MAX_PREDICTION_ROWS) -> list[dict]:
    """The first `limit` rows of the run's predictions.jsonl (none before `eval`); a line that is
    not a JSON object, or longer than 1 MiB, is left out."""
    path = Path(run_dir) / "predictions.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            if len(rows) >= limit:
                break
            if len(raw) > _MAX_LINE_BYTES:
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def eval_page(run_dir: Path | None) -> Path | None:
    """The run's eval.html, if evaluation wrote one."""
    page = Path(run_dir) / "eval.html" if run_dir is not None else None
    return page if page is not None and page.is_file() else None


def require_gradio():
    """Gradio, or the MissingExtraError that names the extra (checked before the model loads)."""
    # before the import: Gradio's telemetry and version check (calls to api.gradio.app) stay off
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError as e:
        raise MissingExtraError(f"serve needs Gradio ({e}): pip install -e '.[serve]'") from None
    return gr


def page(assistant: Assistant, *, uploads: Uploads, max_bytes: int):
    """The Gradio page over the functions above: (Blocks, the app-level settings Gradio 6 takes
    in launch(): its theme)."""
    gr = require_gradio()
    run_dir = assistant.run_dir
    kinds = [k for k in MEDIA_TYPES if k in assistant.modalities]

    def ask(question, *files):
        attachments = []
        try:
            for kind, f in zip(kinds, files):
                if f:
                    attachments.append((kind, check_upload(assistant, kind, f, uploads=uploads, max_bytes=max_bytes)))
            yield from compare(assistant, question or "", attachments)
        except UserError as e:
            raise gr.Error(str(e)) from None

    # system fonts (the default theme's are Google Fonts): the page loads nothing from the network
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    with gr.Blocks(title="omni-finetune", analytics_enabled=False) as demo:
        gr.Markdown(f"**{assistant.family.title}** from `{assistant.label}`")
        with gr.Tab("Ask"):
            with gr.Row():
                inputs = [gr.File(label=kind, type="filepath") for kind in kinds]
            question = gr.Textbox(label="question")
            go = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Row():
                plain = not assistant.has_adapter  # an export (merged) or a run not trained yet (base)
                base = gr.Textbox(label="base" if plain else "base (adapter off)", interactive=False)
                tuned = gr.Textbox(label=assistant.name(True) if plain else "tuned (adapter on)", interactive=False)
            go.click(ask, [question, *inputs], [base, tuned], api_visibility="undocumented")
        if run_dir is not None:
            with gr.Tab("Training"):
                status = gr.Markdown()
                curve = gr.LinePlot(x="step", y="loss", title="training loss")

                def refresh():
                    import pandas as pd

                    p = training_progress(run_dir)
                    return p["text"], pd.DataFrame(p["curve"] or [{"step": 0, "loss": float("nan")}])

                gr.Timer(5).tick(refresh, None, [status, curve], api_visibility="undocumented")
                demo.load(refresh, None, [status, curve], api_visibility="undocumented")
            with gr.Tab("Evaluation"):
                html = eval_page(run_dir)
                if html is not None:
                    gr.HTML(f'<iframe src="/gradio_api/file={html}" style="width:100%;height:80vh;border:0"></iframe>')
                rows = predictions(run_dir)
                if rows:
                    gr.Dataframe(value=[[r.get(k, "") for k in rows[0]] for r in rows], headers=list(rows[0]))
                if html is None and not rows:
                    gr.Markdown("no evaluation yet: `python -m finetune eval RUN` writes eval.html and predictions")
    return demo, {"theme": theme}


def serve(assistant: Assistant, *, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 256) -> int:
    """Serve the page until interrupted; returns the exit status."""
    require_gradio()
    if not is_loopback(host):
        print(EXPOSED_WARNING.format(host=host), file=sys.stderr)
    uploads = Uploads()
    os.environ["GRADIO_TEMP_DIR"] = str(uploads.dir)  # Gradio writes each upload under it
    try:
        demo, app = page(assistant, uploads=uploads, max_bytes=int(max_upload_mb * 1e6))
        html = eval_page(assistant.run_dir)
        allowed = [str(html)] if html is not None else []  # that page alone, not the run folder
        # no API-docs link (the endpoints are undocumented), no /monitoring page, no run history
        # in the browser (questions about patients' scans stay out of its storage), no share link,
        # no Node server, no MCP server
        demo.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port or None, allowed_paths=allowed,
            max_file_size=int(max_upload_mb * 1e6), share=False, footer_links=["gradio", "settings"],
            enable_monitoring=False, run_history=False, ssr_mode=False, mcp_server=False, **app)
    finally:
        uploads.close()
    return 0
