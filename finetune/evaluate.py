"""Held-out evaluation: greedy generation scored by exact match, and token loss, base vs tuned.

The base model is the same PEFT model with its adapters disabled, so both are scored in one
run on identical inputs. Scoring: the prediction's first sentence and the sample's short
reference answer (`answer`, else the last assistant turn's first sentence) are normalised
(lower case, punctuation other than inner hyphens removed, leading articles dropped, spaces
collapsed) and must be equal.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import torch

from finetune.errors import ConfigError, MissingFileError
from finetune.families.base import IGNORE_INDEX
from finetune.probes import generate

_ARTICLES = re.compile(r"^(the|a|an)\s+")


def normalise(text: str) -> str:
    """Lower case, no punctuation except inner hyphens, no leading article, single spaces."""
    t = text.lower().strip()
    t = re.sub(r"[^\w\s-]", " ", t)
    t = re.sub(r"(?<!\w)-|-(?!\w)", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return _ARTICLES.sub("", t)


def first_sentence(text: str) -> str:
    """Text up to the first sentence end ('.', '!', '?' followed by space or end)."""
    m = re.search(r"[.!?](\s|$)", text)
    return text[: m.start()] if m else text


def reference_of(sample) -> str:
    """The short reference answer of a sample."""
    if sample.answer:
        return sample.answer
    last = [m for m in sample.messages if m.role == "assistant"][-1]
    return first_sentence(last.text())


def is_match(prediction: str, reference: str) -> bool:
    """Exact match after normalisation, on the prediction's first sentence or all of it."""
    ref = normalise(reference)
    return ref != "" and (normalise(first_sentence(prediction)) == ref or normalise(prediction) == ref)


@torch.no_grad()
def token_loss(model, family, processor, samples, rope, *, batch_size: int) -> float:
    """Mean cross-entropy over all label tokens of the split (one number, not a mean of means)."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        enc = [family.encode(s, processor, rope=rope) for s in samples[i: i + batch_size]]
        batch = family.collate_padded(enc, processor.pad_id)
        labels = batch.pop("labels").to(dev)
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        logits = model(**batch).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        total += float(torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                                         reduction="sum"))
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def score(samples, predictions) -> dict:
    """Accuracy overall, per task, and on the lesion question (tasks lesion and audio)."""
    by_task: dict[str, list[bool]] = {}
    hits = []
    for s, p in zip(samples, predictions):
        ok = is_match(p, reference_of(s))
        hits.append(ok)
        by_task.setdefault(s.task or "all", []).append(ok)
    lesion = by_task.get("lesion", []) + by_task.get("audio", [])
    out = {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits),
           "per_task": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_task.items())}}
    if lesion:
        out["lesion_accuracy"] = sum(lesion) / len(lesion)
    return out


def evaluate(recipe, run_dir: Path | None = None) -> dict:
    """Score the base and the tuned model on the eval split; write eval.json and eval.md.

    Under torchrun (`run` launched on several processes) only rank 0 evaluates; the others
    return an empty result at once (they write nothing and hold no lock)."""
    from peft import PeftModel

    from finetune.runlock import is_main_process

    if not is_main_process():
        return {}
    from finetune.families import family_for
    from finetune.train import choose_precision, prepare_split, quiet_libraries, read_split, torch_dtype

    quiet_libraries()
    run_dir = Path(run_dir or recipe.run_dir)
    from finetune.stages import final_recipe, original_base

    # a staged run: its folder holds the last stage's adapter on the stage before's merged model,
    # and "base" is the model before the first stage
    base_recipe, recipe = original_base(recipe), final_recipe(recipe)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise MissingFileError(f"{adapter}: no adapter; train first (make finetune RECIPE={recipe.name})")
    samples, skipped = read_split(recipe.data.eval, recipe, on_error="skip")
    if not samples and not skipped:
        raise ConfigError("data.eval is empty: evaluation needs a held-out split")
    family = family_for(recipe.model.path, recipe.model.family)
    precision = choose_precision(recipe.train.precision)
    loaded = family.load(recipe, dtype=torch_dtype(precision), attn="sdpa")
    # the checks training ran on this split (instant when it did): under `skip` the same samples
    # are left out, under `raise` the first bad one stops here
    samples, _ = prepare_split(samples, family, loaded, recipe, skipped)
    if skipped and recipe.data.on_error == "raise":
        raise min(skipped, key=lambda e: (str(e.file), e.line or 0))
    if not samples:
        raise ConfigError(f"{recipe.data.eval}: no usable evaluation samples")
    if recipe.eval.max_samples:
        samples = samples[: recipe.eval.max_samples]
    if torch.cuda.is_available() and recipe.model.quantize == "none":
        loaded.model.to("cuda")
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    rope = family.rope_index(loaded.model)
    proc = loaded.processor
    results: dict = {"recipe": recipe.name, "eval_file": recipe.data.eval, "n_samples": len(samples)}
    if skipped:
        results["skipped"] = len(skipped)
    predictions: dict[str, list[str]] = {}
    variants = [("tuned", model, contextlib.nullcontext)]
    if recipe.eval.compare_base:
        if base_recipe is None:
            variants.insert(0, ("base", model, model.disable_adapter))
        else:
            base = family.load(base_recipe, dtype=torch_dtype(precision), attn="sdpa").model
            if torch.cuda.is_available() and recipe.model.quantize == "none":
                base.to("cuda")
            variants.insert(0, ("base", base, contextlib.nullcontext))
    for name, m, ctx in variants:
        t0 = time.time()
        with ctx():
            preds = generate(m, family, proc, samples, rope, max_new_tokens=recipe.eval.max_new_tokens,
                             batch_size=recipe.eval.batch_size)
            loss = token_loss(m, family, proc, samples, rope, batch_size=recipe.eval.batch_size)
        predictions[name] = preds
        results[name] = {**score(samples, preds), "token_loss": loss, "seconds": round(time.time() - t0, 1)}
    results["examples"] = [
        {"id": s.id, "task": s.task, "reference": reference_of(s),
         **{f"{k}_prediction": v[i] for k, v in predictions.items()}}
        for i, s in enumerate(samples[: recipe.eval.examples])
    ]
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    with open(run_dir / "predictions.jsonl", "w") as f:  # every answer, for inspection and comparisons
        for i, s in enumerate(samples):
            f.write(json.dumps({"id": s.id, "task": s.task, "reference": reference_of(s),
                                **{k: v[i] for k, v in predictions.items()}}) + "\n")
    (run_dir / "eval.md").write_text(format_markdown(results))
    return results


def format_markdown(r: dict) -> str:
    """eval.md: before/after table and a few example predictions."""
    names = [n for n in ("base", "tuned") if n in r]
    lines = [f"# Evaluation of {r['recipe']}", "", f"{r['n_samples']} held-out samples from `{r['eval_file']}`.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    keys = [("accuracy", "exact-match accuracy"), ("lesion_accuracy", "lesion question accuracy"),
            ("token_loss", "token loss")]
    for k, label in keys:
        if all(k in r[n] for n in names):
            lines.append(f"| {label} | " + " | ".join(f"{r[n][k]:.3f}" for n in names) + " |")
    tasks = sorted(set().union(*(r[n]["per_task"].keys() for n in names)))
    for t in tasks:
        cells = []
        for n in names:
            pt = r[n]["per_task"].get(t)
            cells.append(f"{pt['accuracy']:.3f} (n={pt['n']})" if pt else "-")
        lines.append(f"| accuracy, task {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Examples", ""]
    for ex in r["examples"]:
        lines.append(f"- `{ex['id']}` ({ex['task']}), reference **{ex['reference']}**")
        for n in names:
            lines.append(f"  - {n}: {ex.get(n + '_prediction', '')!r}")
    return "\n".join(lines) + "\n"


def summary_line(r: dict) -> str:
    """One line for the console: accuracy before -> after."""
    parts = []
    for k, label in (("accuracy", "accuracy"), ("lesion_accuracy", "lesion accuracy")):
        if k in r.get("tuned", {}):
            before = f"{r['base'][k]:.2f} -> " if "base" in r else ""
            parts.append(f"{label} {before}{r['tuned'][k]:.2f}")
    return ", ".join(parts)
