"""`python -m finetune chat`: a run's tuned model (and its base, the adapter off) answering in the
terminal, on every tiny family, as evaluation answers the same sample."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from conftest import TINY_RECIPES
from finetune.chat import answer_once, interactive
from finetune.cli import main
from finetune.data.reading import read_split
from finetune.inference import Turn, describe, open_model
from finetune.probes import generate

pytestmark = pytest.mark.slow

QUESTION = "Is there a lesion?"


@pytest.fixture(scope="module", params=sorted(TINY_RECIPES))
def chat_run(request, tiny_runs):
    """(run folder, its Assistant loaded once on the CPU) for each tiny family."""
    run = tiny_runs(request.param)
    return run, open_model(str(run), device="cpu")


def _media(small_demo, kind, tmp_path):
    """A demo eval image or audio clip, copied beside the test's own eval file."""
    src = sorted((small_demo["eval"].parent / ("images" if kind == "image" else "audio")).iterdir())[0]
    dst = tmp_path / src.name
    shutil.copyfile(src, dst)
    return dst


def _eval_file(tmp_path, turns):
    """A one-sample eval JSONL of `turns` [(attachments, question, answer)], no system message
    (the run's data.system_prompt applies, as in chat)."""
    msgs = []
    for attachments, question, answer in turns:
        msgs.append({"role": "user", "content": [{"type": k, "path": str(p)} for k, p in attachments]
                     + [{"type": "text", "text": question}]})
        msgs.append({"role": "assistant", "content": answer})
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    return path


def _eval_answers(a, path, **kw):
    """eval's greedy answers (finetune.probes.generate) on a file read as eval reads its split."""
    samples, skipped = read_split(str(path), a.recipe)
    assert not skipped and len(samples) == 1
    out = {}
    for name, ctx in (("tuned", None), ("base", a.model.disable_adapter)):
        if ctx is None:
            out[name] = generate(a.model, a.family, a.processor, samples, a.rope, max_new_tokens=a.max_new_tokens,
                                 batch_size=1)[0]
        else:
            with ctx():
                out[name] = generate(a.model, a.family, a.processor, samples, a.rope,
                                     max_new_tokens=a.max_new_tokens, batch_size=1)[0]
    return out


def test_answers_equal_evals_greedy_answers_and_the_adapter_changes_them(chat_run, small_demo, tmp_path):
    run, a = chat_run
    assert a.has_adapter
    image, audio = _media(small_demo, "image", tmp_path), _media(small_demo, "audio", tmp_path)
    attachments = [("audio", audio), ("image", image)]
    ref = _eval_answers(a, _eval_file(tmp_path, [(attachments, QUESTION, "No.")]))
    streamed = []
    tuned = a.ask([], QUESTION, attachments, tuned=True, on_text=streamed.append).answer
    base = answer_once(a, QUESTION, attachments, tuned=False)
    assert tuned == ref["tuned"] and base == ref["base"]
    assert "".join(streamed).strip() == tuned  # the streamed text is the answer
    assert tuned != base, "3 training steps at lr 5e-3 should change the greedy answer"


def test_the_one_shot_command_prints_the_answer_alone(chat_run, small_demo, capsys, tmp_path):
    run, a = chat_run
    image = _media(small_demo, "image", tmp_path)
    expect = {tuned: answer_once(a, QUESTION, [("image", image)], tuned=tuned) for tuned in (True, False)}
    for flags, tuned in (([], True), (["--base"], False)):
        assert main(["chat", str(run), "--prompt", QUESTION, "--image", str(image), "--device", "cpu", *flags]) == 0
        out = capsys.readouterr().out
        assert out == expect[tuned] + "\n"


def _in_order(text, answers):
    """Each answer printed after the one before (streamed after its `tuned: ` or `base: ` label)."""
    at = 0
    for label, answer in answers:
        at = text.index(f"{label}: ", at) + len(label) + 2
        assert text[at:].lstrip().startswith(answer), (label, answer, text[at:at + 200])


def test_interactive_chat_keeps_the_history_and_switches_the_adapter(chat_run, small_demo, tmp_path):
    run, a = chat_run
    image = _media(small_demo, "image", tmp_path)
    second = "What kind of scan is this?"
    script = f"/image {image}\n{QUESTION}\n{second}\n/base\n{QUESTION}\n/tuned\n/quit\n"
    out = io.StringIO()
    assert interactive(a, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    first = a.ask([], QUESTION, [("image", image)]).answer
    # the second question is asked after the first exchange, as a two-turn sample is in eval (an
    # empty answer cannot be a turn of a sample: that exchange is left out of the history)
    before = [([("image", image)], QUESTION, first)] if first else []
    two = _eval_answers(a, _eval_file(tmp_path, [*before, ([], second, "?")]))
    history = [Turn(QUESTION, [("image", image)], first)] if first else []
    history += [Turn(second, [], two["tuned"])] if two["tuned"] else []
    if a.family.name == "qwen2_5_omni":
        assert first and two["tuned"], "the tiny Qwen run should answer: the history is what is tested"
    third = a.ask(history, QUESTION, tuned=False).answer
    assert third != a.ask(history, QUESTION, tuned=True).answer
    _in_order(text, [("tuned", first), ("tuned", two["tuned"]), ("adapter off", ""), ("base", third),
                     ("adapter on", "")])


def test_a_bad_attachment_is_named_and_the_chat_goes_on(chat_run, small_demo, tmp_path):
    run, a = chat_run
    fake = tmp_path / "scan.png"
    fake.write_text("not an image")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    script = f"/image {fake}\n/image {tmp_path / 'missing.png'}\n/video {video}\n{QUESTION}\n"
    out = io.StringIO()
    assert interactive(a, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(errors) == 3, text
    assert str(fake) in errors[0] and "missing.png" in errors[1]
    if "video" not in a.modalities:
        assert "not video" in errors[2]
    else:
        assert str(video) in errors[2]
    assert "attached" not in text
    assert a.ask([], QUESTION).answer in text  # the question is answered without the refused files


def test_a_4bit_base_answers_as_eval_does_with_and_without_the_adapter(tiny_runs, small_demo, tmp_path):
    """QLoRA: the base loads quantised (bitsandbytes' CPU path, as training loaded it)."""
    a = open_model(str(tiny_runs("qwen2_5_omni", "model.quantize=4bit")), device="cpu")
    assert "(4-bit base)" in describe(a)
    assert any(type(m).__name__ == "Linear4bit" for m in a.model.modules())  # quantised, not a float copy
    image = _media(small_demo, "image", tmp_path)
    ref = _eval_answers(a, _eval_file(tmp_path, [([("image", image)], QUESTION, "No.")]))
    got = {name: answer_once(a, QUESTION, [("image", image)], tuned=name == "tuned") for name in ref}
    assert got == ref and got["tuned"] != got["base"]


def test_an_export_folder_is_told_from_a_run_folder(tmp_path):
    """Every export carries its recipe.yaml beside config.json: still an export, not a run."""
    from finetune.inference import is_export_folder

    export, run = tmp_path / "merged", tmp_path / "run"
    for folder in (export, run):
        folder.mkdir()
        (folder / "recipe.yaml").write_text("recipe: {}\n")
    (export / "config.json").write_text("{}")
    (run / ".omni-finetune").write_text("{}")
    assert is_export_folder(export) and is_export_folder(str(export))
    assert not is_export_folder(run) and not is_export_folder(run / "recipe.yaml")


def test_chat_on_the_runs_merged_export_answers_as_the_tuned_run(tiny_runs, small_demo, tmp_path):
    from finetune.export import export_run

    run = tiny_runs("qwen2_5_omni")
    merged = export_run(run, force=True)["merged"]
    tuned = open_model(str(run), device="cpu")
    # the export leaves the system prompt's text out by default: given as `--system` gives it
    exported = open_model(str(merged), system=tuned.recipe.data.system_prompt, device="cpu")
    assert exported.run_dir is None and not exported.has_adapter
    assert not any("no trained adapter" in n for n in exported.notes), exported.notes
    image = _media(small_demo, "image", tmp_path)
    # the merged model's own answer (no adapter to switch: what `chat merged --prompt` prints)
    answer = answer_once(exported, QUESTION, [("image", image)], tuned=False)
    assert answer == answer_once(tuned, QUESTION, [("image", image)])
    # the terminal chat labels it as the merged (tuned) model's, never as the base's
    out = io.StringIO()
    assert interactive(exported, stdin=io.StringIO(f"/image {image}\n{QUESTION}\n/base\n/quit\n"), stdout=out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert any(x.startswith("merged> merged: ") and x.strip().endswith(answer) for x in lines), text
    assert not any(x.startswith(("base", "tuned")) or "> base" in x for x in lines), text
    assert "the tuned model merged" in text  # what /base says there
