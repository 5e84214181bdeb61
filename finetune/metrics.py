"""Scoring functions for evaluation: per-sample metrics, bootstrap intervals, a paired test.

Pure functions on strings and lists of numbers (no torch, no model), so they are tested
against scores worked out by hand.

Per-sample metrics, each returning a score in [0, 1]:

- ``exact``: the prediction's first sentence (or all of it) equals the reference after
  :func:`normalise` (lower case, punctuation other than inner hyphens removed, a leading article
  dropped, spaces collapsed).
- ``yesno``: closed questions. The first word of the prediction must be ``yes`` or ``no`` (after
  leading punctuation and an optional ``Answer:``), and equal the reference's. "Yes.", "yes,
  there is" and "No - clear" are read; "There is no lesion" has no leading yes/no and is wrong.
- ``choice``: multiple choice. The sample carries its options (see :func:`parse_options`); the
  prediction picks one by its letter ("B", "(B)", "B.", "Answer: B", "The answer is B") or by
  the option's text ("Chest X-ray", "It is a chest X-ray"); it is right when that option is
  the reference's.
- ``open``: open answers and reports. Token-level F1 as in SQuAD (bag of normalised tokens,
  articles dropped) is the score; ROUGE-L F (longest common subsequence, through the
  ``rouge-score`` library, on the same tokens so that non-ASCII words count) is reported beside.

Intervals and tests:

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean (seeded: the same values and
  seed give the same interval).
- :func:`paired_test`: a two-sided paired sign-flip (permutation) test of base vs tuned scores on
  the same samples. Under "tuning changes nothing" each sample's difference is as likely to have
  either sign. With 0/1 scores only the samples that changed matter (fixed vs broken) and the
  null distribution is binomial: this is the exact McNemar test. Otherwise the p-value is exact
  by enumeration for up to 16 changed samples, and a seeded Monte Carlo estimate beyond.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from finetune.data.schema import DataError

METRICS = ("exact", "yesno", "choice", "open")

_ARTICLES = re.compile(r"^(the|a|an)\s+")
_ARTICLE_WORDS = frozenset({"a", "an", "the"})
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---- text ------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lower case, no punctuation except inner hyphens, no leading article, single spaces."""
    t = text.lower().strip()
    t = re.sub(r"[^\w\s-]", " ", t)
    t = re.sub(r"(?<!\w)-|-(?!\w)", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return _ARTICLES.sub("", t)


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "\u201e": "\u201c"}


def first_sentence(text: str) -> str:
    """Text up to the first sentence end ('.', '!', '?' followed by space or end) outside quotes.

    A sentence end inside quotes does not count ('She says: "Hello. How are you?" Then...' keeps
    the whole quote); a quote that ends a sentence ('...you?" Then', not '...you?" she asked')
    ends it after the closing mark; a quote never closed protects the rest of the text. An apostrophe (don't, patients')
    is not a quote: a ' opens only after a space or punctuation and closes only before one."""
    open_: list[str] = []  # the closing marks expected, innermost last
    n = len(text)
    for i, ch in enumerate(text):
        before = text[i - 1] if i else " "
        after = text[i + 1] if i + 1 < n else " "
        if open_ and ch == open_[-1] and not (ch in "'\u2019" and (after.isalnum() or after == "_")):
            open_.pop()
            if not open_ and before in ".!?" and after.isspace() and not text[i + 1:].lstrip()[:1].islower():
                return text[: i + 1]
        elif ch in _QUOTES and not (ch == "'" and (before.isalnum() or before == "_" or after.isspace())):
            open_.append(_QUOTES[ch])
        elif ch in ".!?" and not open_ and after.isspace():
            return text[:i]
    return text


def tokens(text: str) -> list[str]:
    """The words of :func:`normalise`'d text with every article (a, an, the) dropped."""
    return [w for w in normalise(text).split() if w not in _ARTICLE_WORDS]


# ---- exact -----------------------------------------------------------------------------------
def is_match(prediction: str, reference: str) -> bool:
    """Exact match after normalisation, on the prediction's first sentence or all of it."""
    ref = normalise(reference)
    return ref != "" and (normalise(first_sentence(prediction)) == ref or normalise(prediction) == ref)


def exact(prediction: str, reference: str) -> float:
    """1.0 when :func:`is_match`, else 0.0."""
    return float(is_match(prediction, reference))


# ---- yes / no --------------------------------------------------------------------------------
_YESNO = re.compile(r"^[\W_]*(?:(?:the\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?(yes|no)\b", re.IGNORECASE)


def yes_or_no(text: str) -> str | None:
    """'yes' or 'no' when the text starts with that word (after punctuation and 'Answer:'), else None."""
    m = _YESNO.match(text.strip())
    return m.group(1).lower() if m else None


def is_yesno(reference: str) -> bool:
    """True when the whole reference is 'yes' or 'no' (what `auto` scores as a closed question)."""
    return normalise(reference) in ("yes", "no")


def yesno(prediction: str, reference: str) -> float:
    """1.0 when the prediction's leading yes/no equals the reference's; a prediction without one is wrong.

    Raises ValueError when the reference itself has no leading yes/no."""
    ref = yes_or_no(reference)
    if ref is None:
        raise ValueError(f"the reference {reference!r} does not start with yes or no")
    return float(yes_or_no(prediction) == ref)


# ---- multiple choice -------------------------------------------------------------------------
def parse_options(raw) -> dict[str, str]:
    """Options as {letter: text}: from a mapping {"A": "Chest X-ray", ...} (keys: single letters,
    any case) or a list ["Chest X-ray", ...] (lettered A, B, C, ... in order).

    Raises ValueError saying what is wrong."""
    if isinstance(raw, Mapping):
        items = list(raw.items())
        bad = [k for k, _ in items if not (isinstance(k, str) and len(k.strip()) == 1 and k.strip().isalpha())]
        if bad:
            raise ValueError(f"option keys must be single letters such as \"A\", got {bad[0]!r}")
        items = [(k.strip().upper(), v) for k, v in items]
        if len({k for k, _ in items}) != len(items):
            raise ValueError("two options have the same letter")
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        if len(raw) > len(_LETTERS):
            raise ValueError(f"{len(raw)} options; at most {len(_LETTERS)} can be lettered")
        items = list(zip(_LETTERS, raw))
    else:
        raise ValueError(f"options must be an object {{\"A\": text, ...}} or a list of texts, got {type(raw).__name__}")
    if len(items) < 2:
        raise ValueError("a multiple-choice sample needs at least two options")
    for k, v in items:
        if not isinstance(v, str) or not normalise(v):
            raise ValueError(f"option {k} must be a non-empty text, got {v!r}")
    return dict(items)


# a letter the answer starts with: "(B)", "[B]", "B.", "B)", "B:", "B - ...", or "B" alone; an
# unbracketed letter followed by a word ("A chest X-ray") is an article, not a choice; a lower-case
# letter counts only alone ("b", "b.")
_LETTER = re.compile(r"^(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?:[.:)]|\s+[-\u2013\u2014]\s|\s*$)|([a-z])[.:)]?\s*$)")
_LEAD = re.compile(r"^[\s*_\"']*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*"
                   r"(?:option\s+)?)?", re.IGNORECASE)


def chosen_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The letter of the option a prediction picks, by letter or by text; None when it picks none.

    A letter that is not among the options is returned as is (a wrong choice). By text: the
    option whose text equals the prediction (its first sentence or all of it), else the one
    option whose text occurs in it as whole words (an option inside a longer matching option,
    such as "X-ray" in "Chest X-ray", does not count on its own)."""
    text = _LEAD.sub("", prediction.strip(), count=1)
    m = _LETTER.match(text)
    if m:
        return next(g for g in m.groups() if g).upper()
    norm_opts = {k: normalise(v) for k, v in options.items()}
    for cand in (normalise(first_sentence(text)), normalise(text)):
        hits = [k for k, v in norm_opts.items() if v == cand]
        if len(hits) == 1:
            return hits[0]
    padded = f" {normalise(text)} "
    inside = [k for k, v in norm_opts.items() if f" {v} " in padded]
    inside = [k for k in inside if not any(k != o and f" {norm_opts[k]} " in f" {norm_opts[o]} " for o in inside)]
    return inside[0] if len(inside) == 1 else None


def choice(prediction: str, reference: str, options) -> float:
    """1.0 when the prediction picks the reference's option (reference: a letter or an option's text).

    Raises ValueError when the options are malformed or the reference names no option."""
    opts = parse_options(options)
    ref = chosen_option(reference, opts)
    if ref not in opts:
        raise ValueError(f"the reference {reference!r} is neither an option letter ({', '.join(opts)}) "
                         "nor an option's text")
    return float(chosen_option(prediction, opts) == ref)


# ---- open answers ----------------------------------------------------------------------------
def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 on :func:`tokens`: 2PR/(P+R) over the bag of shared tokens (1.0 when both are empty)."""
    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


class _Tokenizer:
    """rouge-score's tokenizer interface on our tokens (its default drops every non-ASCII letter)."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of :func:`tokens`) through `rouge-score`."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def open_answer(prediction: str, reference: str) -> dict[str, float]:
    """{'f1': token F1, 'rouge_l': ROUGE-L F} of an open answer."""
    return {"f1": token_f1(prediction, reference), "rouge_l": rouge_l(prediction, reference)}


def auto_metric(reference: str, has_options: bool) -> str:
    """What `eval.metric: auto` uses for a sample: choice with options, yesno for a yes/no reference, else exact."""
    if has_options:
        return "choice"
    return "yesno" if is_yesno(reference) else "exact"


def score_one(metric: str, prediction: str, reference: str, options=None) -> dict:
    """{'score': ...} for one sample under `metric` (and 'rouge_l' for open, 'chosen' for choice,
    'said' for yesno: what was read from the prediction, for reports)."""
    if metric == "exact":
        return {"score": exact(prediction, reference)}
    if metric == "yesno":
        return {"score": yesno(prediction, reference), "said": yes_or_no(prediction)}
    if metric == "choice":
        if options is None:
            raise ValueError("the choice metric needs options")
        return {"score": choice(prediction, reference, options),
                "chosen": chosen_option(prediction, parse_options(options))}
    if metric == "open":
        o = open_answer(prediction, reference)
        return {"score": o["f1"], "rouge_l": o["rouge_l"]}
    raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


# ---- what each sample is scored by ---------------------------------------------------------
def reference_of(sample) -> str:
    """The short reference answer of a sample."""
    if sample.answer:
        return sample.answer
    last = [m for m in sample.messages if m.role == "assistant"][-1]
    return first_sentence(last.text())


def open_reference_of(sample) -> str:
    """The reference of an open answer: `answer`, else the whole last assistant turn."""
    if sample.answer:
        return sample.answer
    return [m for m in sample.messages if m.role == "assistant"][-1].text()


_METRIC_FIX = {
    "choice": 'add "options": {"A": "...", "B": "..."} (or a list of option texts) to the sample, or give it '
              '"metric": "exact" (or set eval.metric)',
}


def plan_metrics(samples, metric: str = "auto") -> list[dict]:
    """For each sample: the metric it is scored by, its reference and its options (None without).

    Checked before any generation: a sample the metric cannot score raises a DataError naming
    its file:line and the fix (with how many more samples have problems)."""
    plans, problems = [], []
    for s in samples:
        try:
            plans.append(_plan_one(s, metric))
        except DataError as e:
            problems.append(e)
    if problems:
        first = problems[0]
        if len(problems) > 1:
            first.problem += f" (and {len(problems) - 1} more sample(s) with problems)"
        raise DataError(first.kind, first.problem, first.fix, file=first.file, line=first.line, field=first.field)
    return plans


def _plan_one(s, default: str) -> dict:
    def err(fld, problem, fix):
        return DataError("eval_metric", problem, fix, file=s.source, line=s.line, field=fld)

    m = s.meta.get("metric", default)
    where = "the sample's \"metric\"" if "metric" in s.meta else "eval.metric"
    if m not in ("auto",) + METRICS:
        raise err("metric", f"unknown metric {m!r}", f"use one of auto, {', '.join(METRICS)}")
    options = None
    if "options" in s.meta:
        try:
            options = parse_options(s.meta["options"])
        except ValueError as e:
            raise err("options", str(e), 'write "options": {"A": "text", "B": "text"} or ["text", "text"]') from None
    ref = reference_of(s)
    if m == "auto":
        m = auto_metric(ref, options is not None)
    if m == "open":
        ref = open_reference_of(s)
    elif m == "choice":
        if options is None:
            raise err("options", f"the metric is choice ({where}) but the sample has no \"options\"",
                      _METRIC_FIX["choice"])
        if chosen_option(ref, options) not in options:
            raise err("answer", f"the reference {ref!r} is neither an option letter ({', '.join(options)}) nor an "
                      "option's text", 'set "answer" to the right option\'s letter, e.g. "answer": "B"')
    elif m == "yesno" and yes_or_no(ref) is None:
        raise err("answer", f"the metric is yesno ({where}) but the reference {ref!r} does not start with yes or no",
                  'set "answer": "yes" or "no", or give the sample "metric": "exact"')
    return {"metric": m, "reference": ref, "options": options}


# ---- intervals and tests ---------------------------------------------------------------------
def bootstrap_ci(values, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of `values`: resample them with
    replacement `n_resamples` times, take the alpha/2 and 1 - alpha/2 quantiles of the means.

    Deterministic for a given seed. `n_resamples=0` gives the zero-width interval at the mean."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci of no values")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples <= 0:
        return float(v.mean()), float(v.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // v.size)  # bounded memory for large sets
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


_EXACT_ENUMERATION = 16  # changed samples up to which every sign pattern is enumerated


def paired_test(base_values, tuned_values, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip test that tuned and base score the same on average.

    The statistic is the sum of differences d = tuned - base over the samples; under the null
    each d is equally likely to be +d or -d. Samples with d = 0 carry no information. When every
    non-zero |d| is equal (0/1 scores: the McNemar case) the null is binomial and p is exact;
    with other differences p is exact up to 16 non-zero ones and a seeded Monte Carlo estimate
    ((1 + hits) / (1 + n_resamples)) beyond. p = 1 when nothing changed."""
    b = np.asarray(base_values, dtype=np.float64).ravel()
    t = np.asarray(tuned_values, dtype=np.float64).ravel()
    if b.shape != t.shape:
        raise ValueError(f"paired_test needs the same samples: {b.size} base vs {t.size} tuned scores")
    d = t - b
    d = d[np.abs(d) > 1e-12]
    m = d.size
    if m == 0:
        return 1.0
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    mags = np.abs(d)
    if np.allclose(mags, mags[0], rtol=0, atol=1e-12):
        # sum = mag * (2j - m) with j ~ Binomial(m, 1/2) positive signs
        k = int((d > 0).sum())
        far = abs(2 * k - m)
        hits = sum(math.comb(m, j) for j in range(m + 1) if abs(2 * j - m) >= far)
        return min(1.0, hits / 2 ** m)
    if m <= _EXACT_ENUMERATION:
        signs = ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1) * 2 - 1
        sums = np.abs(signs @ mags)
        return float((sums >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 4_000_000 // m)
    for start in range(0, n_resamples, chunk):
        n = min(chunk, n_resamples - start)
        signs = rng.integers(0, 2, size=(n, m)) * 2 - 1
        hits += int((np.abs(signs @ mags) >= observed - tol).sum())
    return (1 + hits) / (1 + n_resamples)


def summarise(values, n_resamples: int = 1000, seed: int = 0) -> dict:
    """{'mean', 'ci': [lo, hi], 'n'} of per-sample scores (an empty list gives n = 0 and no mean)."""
    v = [float(x) for x in values]
    if not v:
        return {"mean": None, "ci": None, "n": 0}
    lo, hi = bootstrap_ci(v, n_resamples=n_resamples, seed=seed)
    return {"mean": sum(v) / len(v), "ci": [lo, hi], "n": len(v)}
