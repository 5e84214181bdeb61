"""Held-out evaluation: greedy generation scored by the metric that fits each sample, and token
loss, base vs tuned.

The base model is the same PEFT model with its adapters disabled, so both are scored in one
run on identical inputs. Each sample is scored by `eval.metric` (or its own "metric" key):
exact, yesno, choice or open (finetune/metrics.py says how each reads an answer); `auto`
picks choice for a sample with "options", yesno when the reference is yes or no, else exact.
The reference is the sample's `answer`, else the first sentence of its last assistant turn (a
sentence end inside quotes does not count; for `open`: the whole last assistant turn).

Multiple choice: the options travel in the sample's JSONL line as a top-level "options" key
(kept in `Sample.meta` by the schema), either {"A": "Chest X-ray", "B": "Fundus photograph"}
or a list ["Chest X-ray", "Fundus photograph"] (lettered A, B, ... in order), and "answer" is
the right option's letter or text. The question text should list the options as the model is
to see them: evaluation does not add them to the prompt.

Every figure (overall, per task, per modality) comes with a 95% percentile bootstrap interval
(`eval.bootstrap` resamples, seeded with train.seed), and base vs tuned with the p-value of a
paired sign-flip test (exact McNemar for right/wrong scores). `accuracy` and each group's
`<name>_accuracy` (eval.groups: the demo's `lesion_accuracy`) are exact-match figures; `score` is
the figure under the chosen metric. `eval.general` is a second set (general, not
domain data) scored the same way before and after: the forgetting check.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from peft import PeftModel

from finetune import fsutil, metrics
from finetune.data.reading import check_method, prepare_pairs, prepare_split, read_split
from finetune.errors import ConfigError, MissingFileError
from finetune.families.base import IGNORE_INDEX
from finetune.loss import shifted_cross_entropy
from finetune.metrics import (  # noqa: F401  (this module's API before metrics.py; scoring plans live there)
    first_sentence,
    is_match,
    normalise,
    open_reference_of,
    plan_metrics,
    reference_of,
)
from finetune.models import family_of, load_spec
from finetune.probes import generate, to_model
from finetune.report import NO_TASK, format_markdown, write_html
from finetune.runfolder import lock_run, read_loss_history
from finetune.runtime import choose_precision, is_main_process, quiet_libraries, torch_dtype
from finetune.stages import final_recipe, original_base

MODALITIES = ("image", "audio", "video", "text")


def modalities_of(sample) -> list[str]:
    """The media kinds of a sample (image, audio, video), or ['text'] for a text-only one.
    A sample with an image and audio counts under both."""
    kinds = [k for k in MODALITIES[:3] if k in sample.modalities()]
    return kinds or ["text"]


def _groups(samples) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    by_task: dict[str, list[int]] = {}
    by_mod: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task or NO_TASK, []).append(i)
        for k in modalities_of(s):
            by_mod.setdefault(k, []).append(i)
    return dict(sorted(by_task.items())), {k: by_mod[k] for k in MODALITIES if k in by_mod}


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
        logits = model(**to_model(batch, model, family)).logits.float()
        total += float(shifted_cross_entropy(logits, labels))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def score(samples, predictions, *, metric: str = "auto", plans: list[dict] | None = None, n_resamples: int = 1000,
          seed: int = 0, groups: dict[str, list[str]] | None = None) -> dict:
    """Per-sample scores under each sample's metric, and the figures over them.

    Returns `per_sample` ({metric, score, ...} per sample: 'said' for yesno, 'chosen' for choice,
    'rouge_l' for open); `score` overall and `per_task` / `per_modality` figures ({mean, ci, n});
    `open` (mean F1 and ROUGE-L over the open samples) when there are any; and, as before,
    exact-match `accuracy` overall and per task, and `<name>_accuracy` for each of `groups` (a name
    -> the tasks it gathers, eval.groups)."""
    plans = plans if plans is not None else plan_metrics(samples, metric)
    per_sample = [metrics.score_one(pl["metric"], p, pl["reference"], pl["options"])
                  | {"metric": pl["metric"]} for pl, p in zip(plans, predictions)]
    hits = [is_match(p, reference_of(s)) for s, p in zip(samples, predictions)]
    values = [r["score"] for r in per_sample]

    def fig(idx):
        return metrics.summarise([values[i] for i in idx], n_resamples=n_resamples, seed=seed)

    by_task, by_mod = _groups(samples)
    counts: dict[str, int] = {}
    for r in per_sample:
        counts[r["metric"]] = counts.get(r["metric"], 0) + 1
    out = {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits),
           "score": fig(range(len(values))) | {"metrics": dict(sorted(counts.items()))},
           "per_task": {t: {"accuracy": sum(hits[i] for i in idx) / len(idx), "n": len(idx),
                            **{k: v for k, v in fig(idx).items() if k != "n"},
                            "metrics": sorted({per_sample[i]["metric"] for i in idx})}
                        for t, idx in by_task.items()},
           "per_modality": {k: fig(idx) for k, idx in by_mod.items()},
           "per_sample": per_sample}
    for name, tasks in (groups or {}).items():
        idx = [i for t in tasks for i in by_task.get(t, [])]
        if idx:
            out[f"{name}_accuracy"] = sum(hits[i] for i in idx) / len(idx)
    opened = [i for i, r in enumerate(per_sample) if r["metric"] == "open"]
    if opened:
        out["open"] = {"f1": fig(opened), "rouge_l": metrics.summarise([per_sample[i]["rouge_l"] for i in opened],
                                                                       n_resamples=n_resamples, seed=seed)}
    return out


def compare(samples, base: dict, tuned: dict, *, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Base vs tuned on the same samples: per figure the change of the mean, how many samples got
    better / worse, and the paired test's p-value (metrics.paired_test)."""
    b = [r["score"] for r in base["per_sample"]]
    t = [r["score"] for r in tuned["per_sample"]]

    def one(idx):
        bi, ti = [b[i] for i in idx], [t[i] for i in idx]
        return {"change": (sum(ti) - sum(bi)) / len(idx), "n": len(idx),
                "better": sum(y > x for x, y in zip(bi, ti)), "worse": sum(y < x for x, y in zip(bi, ti)),
                "p": metrics.paired_test(bi, ti, n_resamples=n_resamples, seed=seed)}

    by_task, by_mod = _groups(samples)
    return {"overall": one(range(len(b))), "per_task": {k: one(v) for k, v in by_task.items()},
            "per_modality": {k: one(v) for k, v in by_mod.items()}}


@torch.no_grad()
def sequence_logps(model, family, processor, samples, rope, *, batch_size: int) -> torch.Tensor:
    """Per sample: the sum of the log-probabilities of its label tokens (float32, on the host),
    through the model's own padded path: what DPO compares."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(samples), batch_size):
        enc = [family.encode(s, processor, rope=rope) for s in samples[i: i + batch_size]]
        batch = family.collate_padded(enc, processor.pad_id)
        labels = batch.pop("labels").to(dev)
        logits = model(**to_model(batch, model, family)).logits
        out += [-float(shifted_cross_entropy(logits[r], labels[r])) for r in range(labels.shape[0])]
    return torch.tensor(out, dtype=torch.float32)


def score_preferences(logps: dict[str, torch.Tensor], beta: float, *, reference: str, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
    """Held-out preference figures from each model's per-sample sequence log-probabilities
    (`logps`: name -> [2P], chosen and rejected interleaved, as prepare_pairs orders them).

    `tuned` against `reference` (the model DPO compared with: the adapters disabled) gives the
    implicit rewards, beta times the log-ratios: `accuracy` (the share of pairs whose chosen reward
    is above the rejected one, TRL's rewards/accuracies), `margin`, `chosen_reward`,
    `rejected_reward`, each with its bootstrap interval. Per model, `prefers_chosen`: the share of
    pairs in which the model itself gives the chosen answer the higher log-probability, and the
    paired test of tuned against every other model."""
    pairs = {k: v.view(-1, 2) for k, v in logps.items()}
    rewards = beta * (pairs["tuned"] - pairs[reference])
    margins = rewards[:, 0] - rewards[:, 1]

    def fig(values):
        return metrics.summarise(values.tolist(), n_resamples=n_resamples, seed=seed)

    prefers = {k: (v[:, 0] > v[:, 1]).float() for k, v in pairs.items()}
    return {"beta": beta, "reference": reference, "n_pairs": int(margins.numel()),
            "accuracy": fig((margins > 0).float()), "margin": fig(margins),
            "chosen_reward": fig(rewards[:, 0]), "rejected_reward": fig(rewards[:, 1]),
            "prefers_chosen": {k: fig(v) for k, v in prefers.items()},
            "paired": {f"tuned_vs_{k}": {"change": float((prefers["tuned"] - v).mean()),
                                         "p": metrics.paired_test(v.tolist(), prefers["tuned"].tolist(),
                                                                  seed=seed)}
                       for k, v in prefers.items() if k != "tuned"}}


def _evaluate_preferences(recipe, run_dir: Path, model, family, proc, flat, rope, start, base) -> dict:
    """eval for train.method dpo: the held-out pairs (`flat`: [c0, r0, c1, r1, ...], prepare_pairs)
    scored by score_preferences; `start` disables the adapters (the model before DPO: in a staged
    run the stage before's merged export), `base` is the original model of a staged run (or None)."""
    samples = flat[::2]
    bs = recipe.eval.batch_size
    t0 = time.time()
    logps = {"tuned": sequence_logps(model, family, proc, flat, rope, batch_size=bs)}
    with start():
        logps["start"] = sequence_logps(model, family, proc, flat, rope, batch_size=bs)
    if base is not None:
        logps["base"] = sequence_logps(base, family, proc, flat, rope, batch_size=bs)
    pref = score_preferences(logps, recipe.train.dpo_beta, reference="start", n_resamples=recipe.eval.bootstrap,
                             seed=recipe.train.seed)
    results = {"recipe": recipe.name, "eval_file": recipe.data.eval, "n_samples": len(samples),
               "method": "dpo", "bootstrap": recipe.eval.bootstrap, "preference": pref,
               "seconds": round(time.time() - t0, 1)}
    (run_dir / "eval.html").unlink(missing_ok=True)  # no page from an earlier evaluation left beside these
    fsutil.atomic_write_text(run_dir / "eval.json", json.dumps(results, indent=2))
    with fsutil.atomic_open(run_dir / "predictions.jsonl") as f:  # every pair's log-probabilities
        for i, s in enumerate(samples):
            f.write(json.dumps({"id": s.id, "task": s.task, **{f"{k}_logp_chosen": float(v[2 * i])
                                                                for k, v in logps.items()},
                                **{f"{k}_logp_rejected": float(v[2 * i + 1]) for k, v in logps.items()}}) + "\n")

    def line(name, d):
        return f"| {name} | {d['mean']:.3f} | [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] |"
    md = [f"# Preference evaluation: {recipe.name}", "", f"{len(samples)} held-out pairs ({recipe.data.eval}), "
          f"rewards against the model before DPO (beta {pref['beta']})", "", "| figure | mean | 95% CI |",
          "|---|---|---|", line("preference accuracy", pref["accuracy"]), line("reward margin", pref["margin"]),
          *(line(f"{k}: prefers the chosen answer", v) for k, v in pref["prefers_chosen"].items()), "",
          *(f"- {k}: change {v['change']:+.3f}, p = {v['p']:.3g}" for k, v in pref["paired"].items()), ""]
    fsutil.atomic_write_text(run_dir / "eval.md", "\n".join(md))
    return results


def _score_variants(model, family, proc, samples, rope, recipe, plans, base=None) -> tuple[dict, dict[str, list[str]]]:
    """Generate and score with the adapters off (base, when eval.compare_base) and on (tuned);
    `base`, when given, is the base model loaded on its own (a staged run's original model), and
    the adapters off are then `start`: the model before the last stage (its merged export)."""
    results: dict = {}
    predictions: dict[str, list[str]] = {}
    variants = [("tuned", model, contextlib.nullcontext)]
    if recipe.eval.compare_base:
        variants.insert(0, ("base", model, model.disable_adapter) if base is None
                        else ("base", base, contextlib.nullcontext))
        if base is not None:  # a staged run: the model before its last stage is the adapters disabled
            variants.insert(1, ("start", model, model.disable_adapter))
    for name, m, ctx in variants:
        t0 = time.time()
        with ctx():
            preds = generate(m, family, proc, samples, rope, max_new_tokens=recipe.eval.max_new_tokens,
                             batch_size=recipe.eval.batch_size)
            loss = token_loss(m, family, proc, samples, rope, batch_size=recipe.eval.batch_size)
        predictions[name] = preds
        results[name] = {**score(samples, preds, plans=plans, n_resamples=recipe.eval.bootstrap,
                                 seed=recipe.train.seed, groups=recipe.eval.groups),
                         "token_loss": loss, "seconds": round(time.time() - t0, 1)}
    if "base" in results:
        results["paired"] = compare(samples, results["base"], results["tuned"], seed=recipe.train.seed)
    if "start" in results:  # the last stage's own gain (a DPO or GRPO stage after SFT, say)
        results["paired_start"] = compare(samples, results["start"], results["tuned"], seed=recipe.train.seed)
    return results, predictions


def _sample_rows(samples, plans) -> list[dict]:
    return [{"id": s.id, "task": s.task, "where": s.where, "modalities": modalities_of(s), "metric": pl["metric"],
             "reference": pl["reference"]} for s, pl in zip(samples, plans)]


def _read_general(recipe, family, loaded):
    """The eval.general samples, checked like the eval split (none when it is unset)."""
    if not recipe.eval.general:
        return []
    if not Path(recipe.eval.general).exists():
        raise MissingFileError(f"eval.general: {recipe.eval.general} does not exist (a held-out general JSONL set, "
                               "or '' for none)")
    samples, skipped = read_split(recipe.eval.general, recipe, on_error="skip")
    samples, _ = prepare_split(samples, family, loaded, recipe, skipped)
    if skipped and recipe.data.on_error == "raise":
        raise min(skipped, key=lambda e: (str(e.file), e.line or 0))
    if not samples:
        raise ConfigError(f"eval.general: {recipe.eval.general}: no usable samples")
    return samples[: recipe.eval.max_samples] if recipe.eval.max_samples else samples


def evaluate(recipe, run_dir: Path | None = None) -> dict:
    """Score the base and the tuned model on the eval split; write eval.json and eval.md.

    Under torchrun (`run` launched on several processes) only rank 0 evaluates; the others
    return an empty result at once (they write nothing and hold no lock)."""
    if not is_main_process():
        return {}
    quiet_libraries()
    run_dir = Path(run_dir or recipe.run_dir)
    # a staged run: its folder holds the last stage's adapter on the stage before's merged model,
    # and "base" is the model before the first stage
    base_recipe, recipe = original_base(recipe), final_recipe(recipe)
    adapter = run_dir / "adapter"
    if run_dir.is_dir():
        # one writer: eval.json and the rest are not rewritten under a job writing the folder; a
        # folder that is not a run folder of ours is refused; a cut adapter swap is put right
        lock_run(run_dir)
    if not (adapter / "adapter_config.json").exists():
        raise MissingFileError(f"{adapter}: no adapter; train first (make finetune RECIPE={recipe.name})")
    samples, skipped = read_split(recipe.data.eval, recipe, on_error="skip")
    if not samples and not skipped:
        raise ConfigError("data.eval is empty: evaluation needs a held-out split")
    family = family_of(recipe)
    precision = choose_precision(recipe.train.precision)
    loaded = family.load(load_spec(recipe, dtype=torch_dtype(precision), attn="sdpa"))
    # the checks training ran on this split (instant when it did): under `skip` the same samples
    # are left out, under `raise` the first bad one stops here
    dpo = recipe.train.method == "dpo"
    if dpo:  # the pairs, each checked as its two conversations (kept whole or dropped whole)
        check_method(samples, "dpo", f"data.eval ({recipe.data.eval})")
        samples, _ = prepare_pairs(samples, family, loaded, recipe, skipped)  # [c0, r0, c1, r1, ...]
    else:
        samples, _ = prepare_split(samples, family, loaded, recipe, skipped)
    if skipped and recipe.data.on_error == "raise":
        raise min(skipped, key=lambda e: (str(e.file), e.line or 0))
    if not samples:
        raise ConfigError(f"{recipe.data.eval}: no usable evaluation samples")
    if recipe.eval.max_samples:
        samples = samples[: recipe.eval.max_samples * (2 if dpo else 1)]
    if torch.cuda.is_available() and recipe.model.quantize == "none":
        loaded.model.to("cuda")
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    rope = family.rope_index(loaded.model)
    proc = loaded.processor
    if dpo:
        base = None
        if recipe.eval.compare_base and base_recipe is not None:  # a staged run: the original model too
            base = family.load(load_spec(base_recipe, dtype=torch_dtype(precision), attn="sdpa")).model
            if torch.cuda.is_available() and recipe.model.quantize == "none":
                base.to("cuda")
        return _evaluate_preferences(recipe, run_dir, model, family, proc, samples, rope, model.disable_adapter, base)
    plans = plan_metrics(samples, recipe.eval.metric)
    general = _read_general(recipe, family, loaded)
    general_plans = plan_metrics(general, recipe.eval.metric) if general else []
    results: dict = {"recipe": recipe.name, "eval_file": recipe.data.eval, "n_samples": len(samples),
                     "metric": recipe.eval.metric, "bootstrap": recipe.eval.bootstrap}
    if skipped:
        results["skipped"] = len(skipped)
    base = None  # a staged run's base: the original model, loaded on its own
    if recipe.eval.compare_base and base_recipe is not None:
        base = family.load(load_spec(base_recipe, dtype=torch_dtype(precision), attn="sdpa")).model
        if torch.cuda.is_available() and recipe.model.quantize == "none":
            base.to("cuda")
    scored, predictions = _score_variants(model, family, proc, samples, rope, recipe, plans, base)
    results.update(scored)
    if general:
        g, g_preds = _score_variants(model, family, proc, general, rope, recipe, general_plans, base)
        results["general"] = {"file": recipe.eval.general, "n_samples": len(general), **g,
                              "samples": _sample_rows(general, general_plans)}
        with fsutil.atomic_open(run_dir / "predictions_general.jsonl") as f:
            for i, row in enumerate(results["general"]["samples"]):
                f.write(json.dumps({**row, **{k: v[i] for k, v in g_preds.items()},
                                    **{f"{k}_score": g[k]["per_sample"][i]["score"] for k in g_preds}}) + "\n")
    results["examples"] = [
        {"id": s.id, "task": s.task, "line": s.line, "reference": reference_of(s),
         **{f"{k}_prediction": v[i] for k, v in predictions.items()}}
        for i, s in enumerate(samples[: recipe.eval.examples])
    ]
    results["samples"] = _sample_rows(samples, plans)
    if recipe.eval.report:
        results["report"] = str(run_dir / "eval.html")
        write_html(results, samples, predictions, read_loss_history(run_dir), run_dir / "eval.html",
                   media=recipe.eval.report_media)
    else:  # no page from an earlier evaluation left beside these results
        (run_dir / "eval.html").unlink(missing_ok=True)
    fsutil.atomic_write_text(run_dir / "eval.json", json.dumps(results, indent=2))
    with fsutil.atomic_open(run_dir / "predictions.jsonl") as f:  # every answer, for inspection and comparisons
        for i, s in enumerate(samples):
            f.write(json.dumps({"id": s.id, "task": s.task, "reference": reference_of(s),
                                **{k: v[i] for k, v in predictions.items()}, "metric": plans[i]["metric"],
                                **{f"{k}_score": results[k]["per_sample"][i]["score"] for k in predictions}}) + "\n")
    fsutil.atomic_write_text(run_dir / "eval.md", format_markdown(results))
    return results
