"""Reading a recipe's data as training reads it (layer 4): the demo set generated where the recipe
asks, every source read (JSONL, Parquet, hub, other formats), every sample decoded, encoded and
checked before the first step, and a mixture's epoch selected.

Evaluation, export and verify read their samples through here too, so a sample is read the same
way everywhere (data.on_error: skip drops and counts what cannot be used).
"""

from __future__ import annotations

import time
from pathlib import Path

from finetune import mixture
from finetune.data.prepare import prepare, record_path
from finetune.data.schema import DataError, Sample
from finetune.errors import ConfigError
from finetune.data.sources import load_source
from finetune.demo_data import DEMO_FOLDERS, generate_medical
from finetune.families.base import Family, LoadedModel
from finetune.paths import cache_root
from finetune.recipe import Recipe


def demo_folder(recipe: Recipe) -> Path | None:
    """The folder the recipe's demo dataset (data.demo) is generated into, or None.

    The demo is written only to its own path (demo_data.DEMO_FOLDERS): data.train one local file,
    that folder's train.jsonl, and data.eval its eval.jsonl or none. A recipe that points
    data.train anywhere else (a user's recipe built on a demo one, a hub source) generates nothing.
    """
    if not recipe.data.demo:
        return None

    folder = DEMO_FOLDERS[recipe.data.demo]
    sources = recipe.data.sources()
    if len(sources) != 1 or sources[0].hub or not sources[0].path:
        return None
    # the demo's splits as conversations, or as preference pairs (train.method dpo)
    if Path(sources[0].path).resolve() not in {(folder / n).resolve() for n in ("train.jsonl", "train_pairs.jsonl")}:
        return None
    if recipe.data.eval and Path(recipe.data.eval).resolve() not in {(folder / n).resolve()
                                                                     for n in ("eval.jsonl", "eval_pairs.jsonl")}:
        return None
    return folder


def prepare_data(recipe: Recipe) -> None:
    """Generate the synthetic demo dataset when the recipe asks for it, at its own path
    (demo_folder), and it is missing. The generator writes only into an empty folder or one it
    made (demo_data.generate_medical)."""
    out = demo_folder(recipe)
    if out is None:
        return

    if not all((out / n).exists() for n in ("train.jsonl", "eval.jsonl", "train_pairs.jsonl", "eval_pairs.jsonl")):
        print(f"generating the synthetic medical dataset in {out}/ ...", flush=True)
    generate_medical(out, seed=0)


def read_source(src, recipe: Recipe, on_error: str | None = None) -> tuple[list[Sample], list[DataError]]:
    """All samples of one source (a path or a recipe DataSource); `raise` stops at the first bad
    one, `skip` collects them."""
    if isinstance(src, str) and not src:
        return [], []

    # JSONL (ours), or Parquet / save_to_disk / hub sources read with `datasets` (finetune.data.sources)
    return load_source(src, recipe, on_error=on_error)


def read_split(spec, recipe: Recipe, on_error: str | None = None) -> tuple[list[Sample], list[DataError]]:
    """All samples of a split: a path, a source or a list of sources (concatenated, in order)."""
    samples, errors = [], []
    for src in (spec if isinstance(spec, list) else [spec]):
        got, bad = read_source(src, recipe, on_error)
        samples += got
        errors += bad
    return samples, errors


def prepare_split(samples: list[Sample], family: Family, loaded: LoadedModel, recipe: Recipe,
                  skipped: list[DataError], encodings=None) -> tuple[list[Sample], list[int]]:
    """Decode, count, encode and check every sample before the first step (data/prepare.py);
    the failures go to `skipped`. Returns the usable samples and their planned token counts;
    `encodings` (a packing.EncodedCache) keeps the encodings made, for the collator."""

    if not samples:
        return [], []
    t0, stats = time.time(), {}
    good, lengths, bad = prepare(samples, family, loaded.processor, family.read_config(loaded.base_path),
                                 family.rope_index(loaded.model), max_tokens=recipe.data.max_tokens,
                                 record=record_path(samples, cache_root()), stats=stats, encodings=encodings)
    skipped.extend(bad)
    print(f"data: {samples[0].source}: {len(good)} of {len(samples)} samples ready ({stats['checked']} decoded, encoded "
          f"and checked, {stats['remembered']} unchanged since a run checked them) in {time.time() - t0:.1f} s",
          flush=True)
    return good, lengths


def mix_sources(recipe: Recipe, sources: list, ready: list, run_dir: Path | None) -> tuple[list[Sample], list[int]]:
    """One source: its samples as they are. Several: one epoch's selection of each (finetune.mixture),
    printed and written to mixture.json."""
    if len(sources) == 1:
        return ready[0]

    picks, shares = mixture.select(sources, [ls for _, ls in ready], recipe.train.seed)
    samples = [got[i] for (got, _), idx in zip(ready, picks) for i in idx]
    lengths = [ls[i] for (_, ls), idx in zip(ready, picks) for i in idx]
    print(mixture.format_shares(shares), flush=True)
    if run_dir is not None:
        mixture.write_shares(run_dir, shares, recipe.train.seed)
    return samples, lengths




def check_method(samples: list[Sample], method: str, label: str) -> None:
    """Refuse data of the other kind than train.method takes, once for the source (not once per
    line): preference pairs under sft or grpo, plain conversations under dpo."""
    pair = next((s for s in samples if s.is_preference), None)
    if method in ("sft", "grpo") and pair is not None:
        wants = "SFT data (one answer per conversation)" if method == "sft" else \
            "GRPO prompts (conversations whose last answer is the reference the rewards check)"
        raise ConfigError(f"{label}: this is preference data ({pair.where} has a 'chosen' and a 'rejected' answer); "
                          f"set train.method: dpo to train on the pairs, or give {wants}")
    plain = next((s for s in samples if not s.is_preference), None)
    if method == "dpo" and plain is not None:
        raise ConfigError(f"{label}: train.method dpo needs preference pairs, but {plain.where} is a plain "
                          "conversation (one answer); give its last turn a 'chosen' and a 'rejected' answer "
                          "(README: Preference training), or set train.method: sft")


def prepare_pairs(pairs: list[Sample], family: Family, loaded: LoadedModel, recipe: Recipe,
                  skipped: list[DataError], encodings=None) -> tuple[list[Sample], list[int]]:
    """prepare_split for preference pairs: each pair as its chosen and its rejected conversation
    (packing order: [c0, r0, c1, r1, ...]), checked before step 1 like any sample; a pair one of
    whose two conversations fails is dropped whole (its error is in `skipped`)."""
    flat = [x for s in pairs for x in (s.chosen_sample(), s.rejected_sample())]
    good, lengths = prepare_split(flat, family, loaded, recipe, skipped, encodings)
    kept = {id(s): k for k, s in enumerate(good)}
    out, out_len = [], []
    for p in range(len(pairs)):
        c, r = kept.get(id(flat[2 * p])), kept.get(id(flat[2 * p + 1]))
        if c is not None and r is not None:
            out += [good[c], good[r]]
            out_len += [lengths[c], lengths[r]]
    if len(out) != len(good) and encodings is not None:
        for i in list(encodings.kept):  # indexed by the checked samples, no longer the kept ones
            encodings.forget(i)
    return out, out_len
