"""evaluate.py's scoring: which metric each sample gets, the figures per task and modality with
intervals, the paired comparison, eval.md, and the errors for samples a metric cannot score."""

import re

import pytest

from finetune.data.schema import DataError, parse_sample
from finetune.evaluate import compare, modalities_of, plan_metrics, score
from finetune.report import format_markdown, summary_line


def _sample(line, question, reply, *, media=(), **top):
    content = [{"type": kind, "path": f"{kind}{line}.x"} for kind in media] + [{"type": "text", "text": question}]
    obj = {"id": f"s{line}", "messages": [{"role": "user", "content": content},
                                          {"role": "assistant", "content": reply}], **top}
    return parse_sample(obj, source="eval.jsonl", line=line, base_dir=".", check_files=False)


def _set():
    return [
        _sample(1, "Is there a lesion?", "Yes. A bright spot.", media=["image"], answer="yes", task="lesion"),
        _sample(2, "Is there a lesion?", "No. Clear.", media=["image", "audio"], answer="no", task="lesion"),
        _sample(3, "Which scan? A) Chest X-ray B) Fundus", "B", media=["image"], task="modality",
                options={"A": "Chest X-ray", "B": "Fundus photograph"}),
        _sample(4, "What does CT stand for?", "Computed tomography. It combines projections.", task="text"),
        _sample(5, "Describe the finding.", "A nodule in the right upper lobe.", task="report", metric="open"),
    ]


def test_auto_picks_choice_yesno_exact_and_a_sample_key_overrides():
    plans = plan_metrics(_set(), "auto")
    assert [p["metric"] for p in plans] == ["yesno", "yesno", "choice", "exact", "open"]
    assert plans[3]["reference"] == "Computed tomography"          # first sentence of the reply
    assert plans[4]["reference"] == "A nodule in the right upper lobe."  # open: the whole reply
    assert plans[2]["options"] == {"A": "Chest X-ray", "B": "Fundus photograph"}
    # eval.metric: exact applies to samples without their own key
    assert [p["metric"] for p in plan_metrics(_set(), "exact")] == ["exact"] * 4 + ["open"]


def test_modalities():
    s = _set()
    assert modalities_of(s[1]) == ["image", "audio"] and modalities_of(s[3]) == ["text"]


def test_score_figures_by_hand():
    samples = _set()
    preds = ["Yes, there is.", "yes", "(B)", "Computed tomography.", "nodule in the left upper lobe"]
    r = score(samples, preds, n_resamples=200, groups={"lesion": ["lesion", "audio"], "none": ["no such task"]})
    per = [x["score"] for x in r["per_sample"]]
    # open: pred [nodule, in, left, upper, lobe] vs ref [nodule, in, right, upper, lobe]: 4 shared of 5 -> F1 0.8
    assert per == [1.0, 0.0, 1.0, 1.0, pytest.approx(0.8)]
    assert r["score"]["mean"] == pytest.approx(3.8 / 5) and r["score"]["n"] == 5
    assert r["score"]["metrics"] == {"choice": 1, "exact": 1, "open": 1, "yesno": 2}
    lo, hi = r["score"]["ci"]
    assert lo <= 3.8 / 5 <= hi and hi - lo > 0.1
    assert r["per_task"]["lesion"]["mean"] == 0.5 and r["per_task"]["lesion"]["n"] == 2
    # exact-match accuracy as before: 'yes there is' != 'yes'; '(B)' and 'B' both normalise to 'b';
    # the open reply is not the reference's first sentence -> samples 3 and 4 of 5
    assert r["accuracy"] == pytest.approx(2 / 5)
    assert r["lesion_accuracy"] == 0.0  # eval.groups: the lesion and audio tasks' exact match
    assert "none_accuracy" not in r  # a group of tasks no sample has gives no figure
    # image: samples 1, 2, 3 -> (1 + 0 + 1) / 3; audio: sample 2; text: samples 4, 5
    assert r["per_modality"]["image"]["mean"] == pytest.approx(2 / 3)
    assert r["per_modality"]["audio"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 1}
    assert r["per_modality"]["text"]["mean"] == pytest.approx(0.9)
    assert list(r["per_modality"]) == ["image", "audio", "text"]
    assert r["open"]["f1"]["mean"] == pytest.approx(0.8) and 0 < r["open"]["rouge_l"]["mean"] < 1


def test_compare_counts_and_p_value():
    samples = [_sample(i, "Is there a lesion?", "Yes.", answer="yes", task="lesion") for i in range(1, 11)]
    groups = {"lesion": ["lesion", "audio"]}  # the demo recipes' eval.groups
    base = score(samples, ["no"] * 10, n_resamples=0, groups=groups)
    tuned = score(samples, ["yes"] * 8 + ["no"] * 2, n_resamples=0, groups=groups)
    c = compare(samples, base, tuned)
    assert c["overall"]["better"] == 8 and c["overall"]["worse"] == 0
    assert c["overall"]["change"] == pytest.approx(0.8)
    assert c["overall"]["p"] == pytest.approx(2 / 256)
    assert c["per_task"]["lesion"]["p"] == pytest.approx(2 / 256)
    r = {"recipe": "x", "eval_file": "eval.jsonl", "n_samples": 10, "metric": "auto", "bootstrap": 0,
         "base": {**base, "token_loss": 2.0}, "tuned": {**tuned, "token_loss": 1.0}, "paired": c, "examples": []}
    md = format_markdown(r)
    assert "| score (yesno 10) | 10 | 0.000 | 0.800 | +0.800 p=0.008 |" in md
    assert "| exact-match accuracy |  | 0.000 | 0.800 |" in md
    assert summary_line(r).startswith("score 0.00 -> 0.80 (p=0.008), accuracy 0.00 -> 0.80, lesion accuracy")


def test_markdown_shows_intervals():
    samples = _set()
    r0 = score(samples, ["no", "no", "A", "x", "x"], n_resamples=500)
    r1 = score(samples, ["Yes, there is.", "yes", "(B)", "Computed tomography.", "nodule in the left upper lobe"],
               n_resamples=500)
    r = {"recipe": "x", "eval_file": "e", "n_samples": 5, "metric": "auto", "bootstrap": 500,
         "base": {**r0, "token_loss": 2.0}, "tuned": {**r1, "token_loss": 1.0},
         "paired": compare(samples, r0, r1), "examples": []}
    md = format_markdown(r)
    lo, hi = r1["score"]["ci"]
    assert f"{r1['score']['mean']:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert "| task report (open) | 1 |" in md and "| modality audio | 1 |" in md
    assert "open answers: ROUGE-L" in md


@pytest.mark.parametrize("top, metric, msg, fix", [
    ({"answer": "B"}, "choice",
     'eval.jsonl:7: options: the metric is choice (eval.metric) but the sample has no "options"', 'add "options"'),
    ({"answer": "B", "metric": "choice"}, "auto", "the sample's \"metric\"", 'add "options"'),
    ({"answer": "D", "options": ["x", "y"]}, "auto",
     "eval.jsonl:7: answer: the reference 'D' is neither an option letter (A, B)", 'set "answer" to the right option'),
    ({"answer": "maybe"}, "yesno", "eval.jsonl:7: answer: the metric is yesno", 'set "answer": "yes" or "no"'),
    ({"options": {"A": "x"}}, "auto", "eval.jsonl:7: options: a multiple-choice sample needs at least two options",
     'write "options"'),
    ({"metric": "bleu"}, "auto", "eval.jsonl:7: metric: unknown metric 'bleu'", "use one of auto, exact"),
])
def test_samples_a_metric_cannot_score_are_named_with_the_fix(top, metric, msg, fix):
    s = _sample(7, "Which?", "B.", **top)
    with pytest.raises(DataError) as e:
        plan_metrics([s], metric)
    assert msg in str(e.value) and fix in str(e.value)


def test_several_bad_samples_are_counted():
    bad = [_sample(i, "Which?", "B.", answer="B") for i in (3, 9)]
    with pytest.raises(DataError, match=r"eval.jsonl:3: .*\(and 1 more sample\(s\) with problems\)"):
        plan_metrics(bad, "choice")


@pytest.mark.slow
def test_cli_eval_scores_the_general_set_and_writes_the_page(tmp_path, small_demo):
    """train 2 steps, then `eval` with eval.general: both sets scored base vs tuned, the page written
    and its path printed."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, tiny_overrides

    general = tmp_path / "general.jsonl"
    rows = [
        {"id": "g1", "messages": [{"role": "user", "content": "What does MRI stand for?"},
                                  {"role": "assistant", "content": "Magnetic resonance imaging."}]},
        {"id": "g2", "options": ["Heart", "Lung", "Liver"], "answer": "B",
         "messages": [{"role": "user", "content": "Which organ holds the alveoli? A) Heart B) Lung C) Liver"},
                      {"role": "assistant", "content": "B"}]},
        {"id": "g3", "metric": "open", "messages": [
            {"role": "user", "content": "Describe a normal chest X-ray."},
            {"role": "assistant", "content": "Clear lung fields and a normal heart size."}]},
    ]
    general.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = tiny_overrides(tmp_path, small_demo, "train.max_steps=2", "eval.max_samples=4", "eval.max_new_tokens=4",
                          "eval.bootstrap=200", f"eval.general={general}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in ("train", "eval"):
        res = subprocess.run([sys.executable, "-m", "finetune", cmd, "medical-tiny", *over], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert f"eval page:   {run / 'eval.html'}" in res.stdout and "general set" in res.stdout
    ev = json.loads((run / "eval.json").read_text())
    g = ev["general"]
    assert g["n_samples"] == 3 and [s["metric"] for s in g["samples"]] == ["exact", "choice", "open"]
    for name in ("base", "tuned"):
        assert len(g[name]["per_sample"]) == 3 and g[name]["score"]["n"] == 3
        assert len(ev[name]["per_sample"]) == 4 and "ci" in ev[name]["score"] and "accuracy" in ev[name]
    assert 0 <= g["paired"]["overall"]["p"] <= 1 and 0 <= ev["paired"]["overall"]["p"] <= 1
    assert len((run / "predictions_general.jsonl").read_text().splitlines()) == 3
    assert "| general set: score" in (run / "eval.md").read_text()
    page = (run / "eval.html").read_text()
    assert "general set: score" in page and page.count('class="card"') == 4
    assert "data:image/" in page and "<svg" in page


# ---- eval.md: data-derived text stays text; labels; the reference's first sentence ----------------
def _md_of(samples, preds_base, preds_tuned, **extra):
    base, tuned = score(samples, preds_base, n_resamples=0), score(samples, preds_tuned, n_resamples=0)
    r = {"recipe": "x", "eval_file": "eval.jsonl", "n_samples": len(samples), "metric": "auto", "bootstrap": 0,
         "base": {**base, "token_loss": 2.0}, "tuned": {**tuned, "token_loss": 1.0},
         "paired": compare(samples, base, tuned),
         "examples": [{"id": s.id, "task": s.task, "line": s.line, "reference": pl["reference"],
                       "base_prediction": b, "tuned_prediction": t}
                      for s, pl, b, t in zip(samples, plan_metrics(samples), preds_base, preds_tuned)], **extra}
    return format_markdown(r)


def test_markdown_keeps_data_inert():
    """A model answer, id, task or reference with HTML or table pipes is shown as text: no live tag,
    no extra table cell, no link or image."""
    evil = "<script>alert(1)</script>"
    samples = [_sample(1, "Is it?", "Yes.", answer="yes", task="<img src=x onerror=alert(2)>|x"),
               _sample(2, "Which?", "<b>bold</b> | two [a](http://x.invalid) ![i](http://x.invalid/t.png)",
                       task="t|u", metric="open")]
    samples[0].id = "<i>id</i>"
    md = _md_of(samples, [evil, "a | b"], ["yes", evil], eval_file="<svg onload=alert(3)>.jsonl")
    assert "<" not in md and ">" not in md.replace("->", ""), [ln for ln in md.splitlines() if "<" in ln]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "](http" not in md.replace("\\](", "")  # no markdown link or image survives
    for line in md.splitlines():
        if line.startswith("|"):  # every table row keeps its cells: 5 columns -> 6 unescaped pipes
            assert len(re.findall(r"(?<!\\)\|", line)) == 6, line


def test_markdown_labels_samples_without_id_or_task():
    samples = [_sample(3, "Is it?", "Yes.", answer="yes"), _sample(4, "Is it?", "No.", answer="no", task="lesion")]
    for s in samples:
        s.id = None
    md = _md_of(samples, ["no", "no"], ["yes", "no"])
    assert "None" not in md, md
    examples = md.split("## Examples", 1)[1]
    assert "- line 3, reference" in examples and "- line 4 (lesion), reference" in examples
    with_id = _md_of([_sample(5, "Is it?", "Yes.", answer="yes", task="lesion")], ["no"], ["yes"])
    assert "- s5 (lesion), reference" in with_id


@pytest.mark.parametrize("reply, reference", [
    ('She says: "Hello. How are you?" Then she leaves.', 'She says: "Hello. How are you?"'),
    ("She says: 'Hello. Bye.' Then she leaves.", "She says: 'Hello. Bye.'"),
    ("He wrote \u201cStop. Now.\u201d and left. Later more.", "He wrote \u201cStop. Now.\u201d and left"),
    ("It's a cyst. The patients' scans are clear.", "It's a cyst"),
    ("The patients' scans are clear. More.", "The patients' scans are clear"),
    ('Size 3.5 cm. Benign.', "Size 3.5 cm"),
    ('She says: "Hello. How', 'She says: "Hello. How'),  # a quote never closed: nothing is cut inside it
])
def test_the_reference_is_not_cut_inside_quotes(reply, reference):
    from finetune.metrics import first_sentence

    assert first_sentence(reply) == reference
    assert plan_metrics([_sample(1, "Say?", reply)], "exact")[0]["reference"] == reference
