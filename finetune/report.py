"""eval.html: one self-contained page to look at an evaluation.

Everything is inline (CSS, a few lines of JavaScript, an SVG loss curve, images as base64 PNG or
JPEG thumbnails, audio as base64 WAV), so the page opens from disk, offline. It holds the metrics
table with 95% intervals, the training loss curve from metrics.jsonl, and a sample of eval items
(media, question, reference, base and tuned answer, each marked right or wrong) with filters by
task and by what tuning changed (also from the address: `eval.html#task=lesion&change=fixed`).

The page holds data samples, and opens with a banner that says so: it is shared only where the
eval data may go. `eval.report_media: false` leaves the images and audio out. Files are named by
their file name, never by their folders (no absolute path is written into the page).

Which items are shown (at most `max_examples`, to keep the page small): every item tuning fixed
or broke first, then unchanged ones taken in turn from each task. An answer counts as right when
its score is at least 0.5 (for exact, yesno and choice: when it is right; for open: token F1).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

from finetune import fsutil
from finetune.data.media import load_audio, load_images, load_video

RIGHT_AT = 0.5
THUMB_PX = 96
AUDIO_MAX_S = 10.0  # longer clips are cut for the page
AUDIO_BUDGET = 1_500_000  # bytes of WAV inlined per page (~2 MB as base64); later clips are named, not inlined
MAX_EXAMPLES = 40
NO_TASK = "(no task)"  # the task label of samples that name none ('all' is the filter's "every task")


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _name(path) -> str:
    """The last part of a path (file or folder name)."""
    return re.split(r"[\\/]+", str(path or "").rstrip("\\/"))[-1]


def sample_label(sample_id, *, line: int | None = None, source: str | None = None) -> str:
    """How reports name a sample: its id, else `file.jsonl:line` (the file by name only), else `line N`."""
    if sample_id not in (None, ""):
        return str(sample_id)
    if source:
        return f"{_name(source)}:{line}"
    return f"line {line}" if line else "a sample without id"


_MD_MARKS = re.compile(r"([\\`*_\[\]|~])")


def md_text(x) -> str:
    """Data-derived text for a markdown file: on one line, HTML escaped (a tag stays text in renderers
    that allow HTML) and markdown's inline marks and table pipes backslash-escaped (no link, image,
    emphasis or extra table cell comes from the data)."""
    text = " ".join(("" if x is None else str(x)).split())
    return html.escape(_MD_MARKS.sub(r"\\\1", text), quote=False)


def _no_folders(message: str, path) -> str:
    """An error message with the media file's folders (and any other absolute path) reduced to names."""
    if path:
        message = message.replace(str(Path(path).parent) + "/", "").replace(str(path), _name(path))
    return re.sub(r"(?:[A-Za-z]:)?[\\/](?:[^\s\\/:'\"]+[\\/])+([^\s\\/:'\"]+)", r"\1", message)


def is_right(score: float | None) -> bool:
    """Right/wrong mark of one answer (see the module docstring)."""
    return score is not None and score >= RIGHT_AT


def change_of(base: float | None, tuned: float | None) -> str:
    """'fixed' (wrong -> right), 'broken' (right -> wrong), 'unchanged', or 'tuned only' without a base."""
    if base is None:
        return "tuned only"
    b, t = is_right(base), is_right(tuned)
    return "fixed" if t and not b else "broken" if b and not t else "unchanged"


# ---- media -----------------------------------------------------------------------------------
def thumbnail_uri(image, px: int = THUMB_PX) -> str:
    """A PIL image as a data: URI at most `px` on its longer side: PNG, or JPEG (quality 85) when
    that is smaller (noisy scans and photos are several times smaller as JPEG; flat images as PNG)."""
    im = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    im.thumbnail((px, px))
    best = ""
    for fmt, mime, kw in (("PNG", "png", {"optimize": True}), ("JPEG", "jpeg", {"quality": 85})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        uri = f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        best = uri if not best or len(uri) < len(best) else best
    return best


def wav_uri(wave, sampling_rate: int) -> str:
    """Mono float samples as a data: URI of a 16-bit PCM WAV."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sampling_rate, subtype="PCM_16", format="WAV")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _media_html(sample, budget: list[int]) -> str:
    out = []
    for part in sample.media():
        name = Path(part.path).name if part.path else (Path(part.frames[0]).parent.name if part.frames else part.type)
        try:
            if part.type == "image":
                for im in load_images(part)[:4]:
                    out.append(f'<img class="thumb" alt="{_e(name)}" title="{_e(name)}" src="{thumbnail_uri(im)}">')
            elif part.type == "video":
                frames = load_video(part, max_frames=3)
                out.append('<span class="video" title="video: first, middle and last frame">' + "".join(
                    f'<img class="thumb small" alt="{_e(name)} frame" src="{thumbnail_uri(f, THUMB_PX // 2)}">'
                    for f in frames) + "</span>")
            elif part.type == "audio":
                sr = 16000
                wave = load_audio(part.path, sr)[: int(AUDIO_MAX_S * sr)]
                if budget[0] < wave.size * 2:
                    out.append(f'<span class="note">audio {_e(name)} not inlined (page size cap)</span>')
                    continue
                budget[0] -= wave.size * 2
                out.append(f'<audio controls preload="metadata" title="{_e(name)}" src="{wav_uri(wave, sr)}"></audio>')
        except Exception as e:  # a page with one missing thumbnail beats no page
            why = _no_folders(str(e), part.path or (part.frames[0] if part.frames else ""))
            out.append(f'<span class="note">{_e(part.type)} {_e(name)} not shown: {_e(why)}</span>')
    return "".join(out)


def _question(sample) -> str:
    users = [m for m in sample.messages if m.role == "user"]
    return users[-1].text() if users else ""


# ---- loss curve ------------------------------------------------------------------------------
#: the chart's own look, for an SVG file of its own (eval.html styles the inline one with _CSS)
_SVG_STYLE = ("<style>svg{background:#f6f8fa}text{font:11px system-ui,sans-serif;fill:#57606a}.grid{stroke:#d0d7de}"
              ".curve{fill:none;stroke:#1f4e79;stroke-width:1.5}.stage{stroke:#bf8700;stroke-dasharray:4 3}</style>")


def loss_svg(history: list[dict], width: int = 640, height: int = 220, standalone: bool = False) -> str:
    """An SVG line chart of training loss against step ('' when there is no record): inline in
    eval.html, or `standalone` (its own style and namespace) as the run folder's loss_curve.svg."""
    pts = [(float(r["step"]), float(r["loss"])) for r in history
           if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not pts:
        return ""
    pts.sort()
    left, right, top, bottom = 52, 12, 12, 30
    x0, x1 = pts[0][0], pts[-1][0]
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    w, h = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * w

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * h

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    grid = []
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        grid.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                    f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    stages = []
    seen = None
    for r in history:  # staged runs: a marker where each stage begins
        st = r.get("stage")
        if st is not None and st != seen and isinstance(r.get("step"), (int, float)):
            seen = st
            x = sx(float(r["step"]))
            stages.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + h}" class="stage"/>'
                          f'<text x="{x + 3:.1f}" y="{top + 10}">{_e(st)}</text>')
    head = ('xmlns="http://www.w3.org/2000/svg" ' if standalone else 'id="loss" ')
    return (f'<svg {head}width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="training loss per step">' + (_SVG_STYLE if standalone else "") + "".join(grid) +
            "".join(stages) +
            f'<polyline points="{line}" class="curve"/>'
            f'<text x="{left}" y="{height - 8}">step {x0:g}</text>'
            f'<text x="{left + w}" y="{height - 8}" text-anchor="end">step {x1:g}</text></svg>')


# ---- page ------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#57606a}
table.metrics{border-collapse:collapse}
table.metrics th{background:#1f4e79;color:#fff;text-align:left;padding:5px 10px}
table.metrics td{border-bottom:1px solid #d0d7de;padding:4px 10px;font-variant-numeric:tabular-nums}
table.metrics tr.task td:first-child,table.metrics tr.modality td:first-child{padding-left:22px}
.ci{color:#57606a;font-size:12px}.up{color:#1a7f37}.down{color:#cf222e}
svg#loss{background:#f6f8fa;border:1px solid #d0d7de}svg text{font-size:11px;fill:#57606a}
svg .grid{stroke:#d0d7de}svg .curve{fill:none;stroke:#1f4e79;stroke-width:1.5}
svg .stage{stroke:#bf8700;stroke-dasharray:4 3}
.filters{margin:8px 0 12px}.filters select{margin-right:14px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:10px;margin:8px 0;display:flex;gap:14px}
.media{min-width:100px;display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.media audio{width:260px}
img.thumb{border:1px solid #d0d7de;image-rendering:auto}
.body{flex:1}.q{font-weight:600}.meta{color:#57606a;font-size:12px}
.ans{margin:2px 0}.ok::before{content:"\\2714  ";color:#1a7f37}.bad::before{content:"\\2718  ";color:#cf222e}
.tag{font-size:11px;border-radius:10px;padding:1px 7px;margin-left:6px;background:#eaeef2}
.tag.fixed{background:#dafbe1}.tag.broken{background:#ffebe9}
.note{color:#57606a;font-size:12px}
.banner{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;margin:0 0 16px}
"""

_JS = """
function applyFilters(){
  var t=document.getElementById('f-task').value, c=document.getElementById('f-change').value, n=0, all=0;
  document.querySelectorAll('.card').forEach(function(el){
    all++; var show=(t==='*'||el.dataset.task===t)&&(c==='*'||el.dataset.change===c);
    el.style.display=show?'':'none'; if(show)n++;});
  document.getElementById('f-count').textContent='showing '+n+' of '+all;
}
function fromHash(){  // eval.html#task=lesion&change=fixed opens filtered
  location.hash.replace(/^#/,'').split('&').forEach(function(kv){
    var p=kv.split('='), el=document.getElementById('f-'+p[0]), v=decodeURIComponent(p[1]||'');
    if(el&&Array.prototype.some.call(el.options,function(o){return o.value===v;}))el.value=v;});
  applyFilters();
}
document.getElementById('f-task').addEventListener('change',applyFilters);
document.getElementById('f-change').addEventListener('change',applyFilters);
window.addEventListener('hashchange',fromHash);
fromHash();
"""


# ---- figures (eval.md, eval.html, the console) ----------------------------------------------
def fmt_figure(f: dict | None) -> str:
    """'0.812 [0.750, 0.870]' (the interval when there is one), '-' for no figure."""
    if not f or f.get("mean") is None:
        return "-"
    ci = f.get("ci")
    return f"{f['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] != ci[1] else "")


def fmt_p(p: float | None) -> str:
    """A p-value for tables: 'p=0.031', 'p<0.001'."""
    if p is None:
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _metric_label(counts) -> str:
    if isinstance(counts, dict):
        return ", ".join(f"{k} {v}" for k, v in counts.items())
    return ", ".join(counts)


#: the models an evaluation scores, in order: the original base, a staged run's model before its last
#: stage, the tuned model
MODELS = ("base", "start", "tuned")


def figure_rows(r: dict) -> list[dict]:
    """The rows of the metrics table (eval.md and eval.html): label, n, a figure per model,
    the change and its p-value (tuned against base; a staged run's `start`, the model before its
    last stage, has a column of its own)."""
    names = [n for n in MODELS if n in r]
    paired = r.get("paired", {})
    rows = []

    def add(label, n, figs, pair=None, kind="score"):
        rows.append({"label": label, "n": n, "kind": kind, "figures": figs,
                     "change": pair.get("change") if pair else None, "p": pair.get("p") if pair else None})

    sc = r[names[-1]]["score"]
    add(f"score ({_metric_label(sc.get('metrics', {}))})", sc["n"], {n: r[n]["score"] for n in names},
        paired.get("overall"))
    for t, pt in r[names[-1]]["per_task"].items():
        task = "samples without a task" if t == NO_TASK else f"task {t}"
        add(f"{task} ({_metric_label(pt.get('metrics', []))})", pt["n"],
            {n: r[n]["per_task"].get(t) for n in names}, paired.get("per_task", {}).get(t), kind="task")
    for k, pm in r[names[-1]]["per_modality"].items():
        add(f"modality {k}", pm["n"], {n: r[n]["per_modality"].get(k) for n in names},
            paired.get("per_modality", {}).get(k), kind="modality")
    if "open" in r[names[-1]]:
        for k, label in (("f1", "open answers: token F1"), ("rouge_l", "open answers: ROUGE-L")):
            add(label, r[names[-1]]["open"][k]["n"], {n: r[n]["open"][k] for n in names}, kind="open")
    groups = [k for k in r[names[-1]] if k.endswith("_accuracy") and k != "accuracy"]  # eval.groups
    for k, label in (("accuracy", "exact-match accuracy"),
                     *((g, f"{g.removesuffix('_accuracy')} accuracy (group)") for g in groups),
                     ("token_loss", "token loss")):
        if all(k in r[n] for n in names):
            add(label, None, {n: {"mean": r[n][k], "ci": None} for n in names}, kind="plain")
    g = r.get("general")
    if g:
        gnames = [n for n in names if n in g]
        add(f"general set: score ({_metric_label(g[gnames[-1]]['score'].get('metrics', {}))})", g["n_samples"],
            {n: g[n]["score"] for n in gnames}, g.get("paired", {}).get("overall"), kind="general")
        add("general set: token loss", None, {n: {"mean": g[n]["token_loss"], "ci": None} for n in gnames},
            kind="general")
    return rows


def format_markdown(r: dict) -> str:
    """eval.md: before/after table with 95% intervals and paired p-values, and a few example predictions.

    Every data-derived field (ids, tasks, references, answers, file names) goes through
    report.md_text: a tag in a model answer stays text, a pipe does not split a table cell."""
    names = [n for n in MODELS if n in r]
    lines = [f"# Evaluation of {md_text(r['recipe'])}", "", f"{r['n_samples']} held-out samples from "
             f"{md_text(r['eval_file'])}; metric {md_text(r.get('metric', 'exact'))}. Figures are means with a 95% "
             f"bootstrap interval ({r.get('bootstrap', 0)} resamples); p is a paired sign-flip test of base vs tuned "
             "(exact McNemar for right/wrong scores).", ""]
    head = "| figure | n | " + " | ".join(names) + (" | change |" if "paired" in r else " |")
    lines += [head, "|---|---|" + "---|" * (len(names) + ("paired" in r))]
    for row in figure_rows(r):
        cells = [fmt_figure(row["figures"].get(n)) for n in names]
        line = f"| {md_text(row['label'])} | {row['n'] if row['n'] is not None else ''} | " + " | ".join(cells) + " |"
        if "paired" in r:
            ch = "" if row["change"] is None else f"{row['change']:+.3f} {fmt_p(row['p'])}"
            line += f" {ch} |"
        lines.append(line)
    start = r.get("paired_start", {}).get("overall")
    if start:
        lines += ["", f"The last stage's own gain: tuned against start (the model before the last stage), change "
                      f"{start['change']:+.3f} {fmt_p(start['p'])} ({start['better']} better, {start['worse']} worse)."]
    if r.get("report"):
        lines += ["", f"The page with the loss curve and the examples: {md_text(Path(r['report']).name)}."]
    lines += ["", "## Examples", ""]
    for ex in r["examples"]:
        label = md_text(sample_label(ex.get("id"), line=ex.get("line")))
        task = f" ({md_text(ex['task'])})" if ex.get("task") else ""
        lines.append(f"- {label}{task}, reference **{md_text(ex['reference'])}**")
        for n in names:
            lines.append(f"  - {n}: {md_text(ex.get(n + '_prediction', '')) or '(no answer)'}")
    return "\n".join(lines) + "\n"


def summary_line(r: dict) -> str:
    """One line for the console: score (with the paired p), accuracy and the general set, before -> after."""
    parts = []
    if "score" in r.get("tuned", {}):
        before = f"{r['base']['score']['mean']:.2f} -> " if "base" in r else ""
        p = f" ({fmt_p(r['paired']['overall']['p'])})" if "paired" in r else ""
        parts.append(f"score {before}{r['tuned']['score']['mean']:.2f}{p}")
    groups = [k for k in r.get("tuned", {}) if k.endswith("_accuracy") and k != "accuracy"]  # eval.groups
    for k, label in (("accuracy", "accuracy"), *((g, g.replace("_", " ")) for g in groups)):
        if k in r.get("tuned", {}):
            before = f"{r['base'][k]:.2f} -> " if "base" in r else ""
            parts.append(f"{label} {before}{r['tuned'][k]:.2f}")
    g = r.get("general")
    if g:
        before = f"{g['base']['score']['mean']:.2f} -> " if "base" in g else ""
        parts.append(f"general set {before}{g['tuned']['score']['mean']:.2f}")
    return ", ".join(parts)


def _figure_cell(f) -> str:
    if not f or f.get("mean") is None:
        return "<td>-</td>"
    ci = f.get("ci")
    extra = f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci and ci[0] != ci[1] else ""
    return f"<td>{f['mean']:.3f}{extra}</td>"


def _metrics_table(results: dict) -> str:
    names = [n for n in MODELS if n in results]
    paired = "paired" in results
    head = "<tr><th>figure</th><th>n</th>" + "".join(f"<th>{n}</th>" for n in names) + \
        ("<th>change</th>" if paired else "") + "</tr>"
    rows = []
    for r in figure_rows(results):
        cells = "".join(_figure_cell(r["figures"].get(n)) for n in names)
        ch = ""
        if paired:
            if r["change"] is None:
                ch = "<td></td>"
            else:
                cls = "up" if r["change"] > 0 else "down" if r["change"] < 0 else ""
                ch = f'<td class="{cls}">{r["change"]:+.3f} <span class="ci">{fmt_p(r["p"])}</span></td>'
        n = "" if r["n"] is None else r["n"]
        rows.append(f'<tr class="{r["kind"]}"><td>{_e(r["label"])}</td><td>{n}</td>{cells}{ch}</tr>')
    return f'<table class="metrics" id="metrics">{head}{"".join(rows)}</table>'


def pick_examples(changes: list[str], tasks: list[str], k: int) -> list[int]:
    """Indices of the items to show: fixed and broken first, then unchanged round-robin over tasks;
    returned in their original order."""
    changed = [i for i, c in enumerate(changes) if c in ("fixed", "broken")]
    chosen = changed[:k]
    rest: dict[str, list[int]] = {}
    for i, c in enumerate(changes):
        if c not in ("fixed", "broken"):
            rest.setdefault(tasks[i], []).append(i)
    queues = list(rest.values())
    while len(chosen) < k and any(queues):
        for q in queues:
            if q and len(chosen) < k:
                chosen.append(q.pop(0))
    return sorted(chosen)


def _answer(label: str, text: str, sc: dict | None) -> str:
    if sc is None:
        return ""
    mark = "ok" if is_right(sc["score"]) else "bad"
    detail = f' <span class="ci">F1 {sc["score"]:.2f}, ROUGE-L {sc.get("rouge_l", 0):.2f}</span>' \
        if sc.get("metric") == "open" else ""
    return f'<div class="ans {mark}"><b>{label}:</b> {_e(text)}{detail}</div>'


def _banner(media: bool) -> str:
    what = ("images, audio, questions, reference answers and the model's answers" if media else
            "questions, reference answers and the model's answers (media left out)")
    return (f'<div class="banner" role="note"><b>This page contains data samples</b> from the evaluation set: '
            f'{what}. It should be shared only where that data may go'
            + (" (eval.report_media: false leaves the images and audio out)." if media else ".") + "</div>")


def _media_kinds(sample) -> str:
    kinds = sorted({p.type for p in sample.media()})
    return f'<span class="note">{_e(", ".join(kinds))} left out</span>' if kinds else ""


def write_html(results: dict, samples, predictions: dict[str, list[str]], loss_history: list[dict], path,
               max_examples: int = MAX_EXAMPLES, *, media: bool = True) -> Path:
    """Write eval.html (self-contained: no request leaves the page) and return its path.

    `results` is what evaluate() writes to eval.json (per-sample scores under results[name]
    ['per_sample'], the rows under results['samples']); `samples` and `predictions` are the eval
    items and the answers per model name ('base', 'tuned'); `loss_history` the metrics.jsonl
    records with a 'loss'; `media` False (eval.report_media: false) leaves images and audio out."""
    path = Path(path)
    names = [n for n in ("base", "tuned") if n in predictions]
    per = {n: results[n]["per_sample"] for n in names}
    changes = [change_of(per["base"][i]["score"] if "base" in per else None, per["tuned"][i]["score"])
               for i in range(len(samples))]
    tasks = [s.task or NO_TASK for s in samples]
    shown = pick_examples(changes, tasks, max_examples)
    budget = [AUDIO_BUDGET]
    cards = []
    for i in shown:
        s = samples[i]
        metric = per["tuned"][i]["metric"]
        ref = results.get("samples", [{}] * len(samples))[i].get("reference", s.answer or "")
        answers = "".join(_answer(n, predictions[n][i], per[n][i]) for n in names)
        tag = f'<span class="tag {changes[i].replace(" ", "-")}">{_e(changes[i])}</span>'
        cards.append(
            f'<div class="card" data-task="{_e(tasks[i])}" data-change="{_e(changes[i])}">'
            f'<div class="media">{_media_html(s, budget) if media else _media_kinds(s)}</div><div class="body">'
            f'<div class="meta">{_e(sample_label(s.id, line=s.line, source=s.source))} &middot; task {_e(tasks[i])} '
            f'&middot; {_e(metric)}{tag}</div>'
            f'<div class="q">{_e(_question(s))}</div><div class="ans"><b>reference:</b> {_e(ref)}</div>'
            f"{answers}</div></div>")
    counts = {c: changes.count(c) for c in ("fixed", "broken", "unchanged", "tuned only") if c in changes}
    task_opts = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in sorted(set(tasks[i] for i in shown)))
    change_opts = "".join(
        f'<option value="{c}">{label} ({counts.get(c, 0)} in all)</option>'
        for c, label in (("fixed", "fixed by tuning"), ("broken", "broken by tuning"), ("unchanged", "unchanged"))
        if "base" in per)
    tally = ", ".join(f"{v} {k}" for k, v in counts.items())
    svg = loss_svg(loss_history)
    general = results.get("general")
    gline = (f'<p class="sub">General set (forgetting check): <code>{_e(_name(general["file"]))}</code>, '
             f'{general["n_samples"]} samples; rows "general set" above.</p>' if general else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Evaluation of {_e(results.get("recipe"))}</title><style>{_CSS}</style></head><body>
{_banner(media)}
<h1>Evaluation of {_e(results.get("recipe"))}</h1>
<p class="sub">{results.get("n_samples")} held-out samples from <code>{_e(_name(results.get("eval_file")))}</code>;
metric <code>{_e(results.get("metric", "exact"))}</code>. Means with a 95% bootstrap interval
({results.get("bootstrap", 0)} resamples); change is tuned &minus; base with the p-value of a paired sign-flip
test (exact McNemar for right/wrong scores).</p>
<h2>Metrics</h2>{_metrics_table(results)}{gline}
<h2>Training loss</h2>{svg or '<p class="note">no training loss records (metrics.jsonl) in the run folder</p>'}
<h2>Examples</h2>
<p class="sub">{len(shown)} of {len(samples)} items: every one tuning fixed or broke first, then others from each
task. An answer is marked right when its score is at least {RIGHT_AT}. In all: {_e(tally)}.{"" if media else
" Images and audio are left out (eval.report_media: false)."}</p>
<div class="filters"><label>task <select id="f-task"><option value="*">all</option>{task_opts}</select></label>
<label>change <select id="f-change"><option value="*">all</option>{change_opts}</select></label>
<span id="f-count" class="sub"></span></div>
{"".join(cards)}
<script>{_JS}</script></body></html>
"""
    fsutil.atomic_write_text(path, page)
    return path
