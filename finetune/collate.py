"""From samples to the Trainer's batches (layer 4): packed rows or padded batches, with the
towers' host inputs, the label positions of the loss head and the token counts, and the rows
data-loader workers share.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import attention
from finetune.data.schema import Sample
from finetune.errors import ConfigError
from finetune.families.base import EncodedSample, Family
from finetune.grpo import NUM_COMPLETIONS
from finetune.loss import LABEL_POSITIONS, label_positions
from finetune.metrics import plan_metrics
from finetune.packing import (
    REAL_TOKENS,
    EncodedCache,
    PackedCollator,
    PairPackedCollator,
    SharedRows,
    bin_dataset,
    efficiency,
    pack_completions,
    plan_bins,
    plan_pair_bins,
    idle_indices,
    with_idle_media,
)
from finetune.paths import cache_root
from finetune.recipe import Recipe
from finetune.runtime import data_workers, rank


def index_dataset(n: int):
    """The Trainer sees sample indices only (TRL wants a `datasets.Dataset`); the collator encodes.

    Encoding in the collator keeps media decoding in the DataLoader's workers and lets the
    Trainer's seeded sampler (and its resume logic) own the data order.
    """
    import datasets

    return datasets.Dataset.from_dict({"index": list(range(n))})


@dataclass
class PaddedCollator:
    """Right-padded batches with an attention mask (the model computes its positions)."""

    family: Family
    processor: Any
    samples: list
    rope: Any
    towers: Any = None  # Family.tower_inputs: the media towers' boundaries, computed here
    cache_bytes: int = 0  # encoded samples kept between epochs (packing.EncodedCache)
    encoded: Any = None  # an EncodedCache already filled (by the checks before step 1), else a new one
    idle: list = field(default_factory=list)  # packing.idle_media: every tower runs on every rank

    def __post_init__(self):
        if self.encoded is None:
            self.encoded = EncodedCache(self.family, self.processor, self.samples, self.rope, self.cache_bytes)

    def encode(self, features: list[dict]) -> list[EncodedSample]:
        return [self.encoded(f["index"]) for f in features]

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        encoded = self.encode(features)
        real = sum(e.num_tokens for e in encoded)
        encoded = encoded + with_idle_media(self.family, encoded, self.idle)  # rows of their own, labels ignored
        batch = self.family.collate_padded(encoded, self.processor.pad_id)
        if self.towers is not None:
            batch.update(self.towers(batch))
        batch[REAL_TOKENS] = real  # a host int for the token count
        batch[LABEL_POSITIONS] = label_positions(batch["labels"])  # the loss's head runs there only
        return batch


#: the GRPO collator's key: the step's prompts (Sample objects) and their metric plans
PROMPTS = "grpo_prompts"
PLANS = "grpo_plans"


@dataclass
class PromptCollator:
    """GRPO: a batch is its prompts, not tensors: the completions are sampled and packed in the
    trainer's step (finetune.rollout, packing.pack_completions), with what this collator holds (the
    family, processor, positions, towers, row budget and group size). NUM_COMPLETIONS counts the
    completions (a host int), so the step's loss is their mean over micro-batches and ranks."""

    family: Family
    processor: Any
    samples: list
    rope: Any
    plans: list
    group: int
    max_tokens: int
    with_varlen_args: bool = False
    towers: Any = None
    # sharded weights: every tower runs on every rank (packing.idle_media), in the rollouts too:
    # the prompts that stand for each media kind (generated beside the step's, answers dropped)
    # and their encodings with labels ignored (packed beside the completions)
    idle_prompts: list = field(default_factory=list)
    idle: list = field(default_factory=list)

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        idx = [f["index"] for f in features]
        return {PROMPTS: [self.samples[i] for i in idx], PLANS: [self.plans[i] for i in idx],
                NUM_COMPLETIONS: len(idx) * self.group}

    def pack(self, samples: list) -> dict[str, Any]:
        """The completions' conversations encoded and packed (packing.pack_completions)."""
        encoded = [self.family.encode(s, self.processor, rope=self.rope) for s in samples]
        return pack_completions(self.family, encoded, self.processor.pad_id, self.max_tokens,
                                with_varlen_args=self.with_varlen_args, towers=self.towers, idle=self.idle)

    def idle_prompts_for(self, prompts: list) -> list:
        """The idle prompts that bring the media kinds none of `prompts` has (sharded weights)."""
        have = set().union(*(p.modalities() for p in prompts)) if prompts else set()
        out = []
        for s in self.idle_prompts:
            if (s.modalities() & set(self.family.media_keys)) - have:
                out.append(s)
                have |= s.modalities()
        return out


@dataclass
class RecordingCollator:
    """Debug hook (FINETUNE_RECORD_BATCHES=<folder>): append each batch's dataset items (packed
    bins or sample indices) to <folder>/batches-rank<R>.jsonl, then collate as usual."""

    inner: Any
    path: Path

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        with open(self.path, "a") as f:
            f.write(json.dumps([f_.get("bin", f_.get("index")) for f_ in features]) + "\n")
        return self.inner(features)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (unpickling in a data-loader worker)
            raise AttributeError(name)
        return getattr(self.inner, name)


def record_batches(collator):
    folder = os.environ.get("FINETUNE_RECORD_BATCHES")
    if not folder:
        return collator
    Path(folder).mkdir(parents=True, exist_ok=True)

    return RecordingCollator(collator, Path(folder) / f"batches-rank{rank()}.jsonl")


def collator_cache_bytes(recipe: Recipe, shared: bool = False) -> int:
    """data.cache_gb in bytes: all of it for what the data-loader processes share (SharedRows, the
    encodings the main process keeps), else each process's share."""
    return int(recipe.data.cache_gb * 2 ** 30 / (1 if shared else max(1, data_workers(recipe.data.num_workers))))


def rows_folder() -> Path:
    """A folder of this process for the packed rows its data-loader workers share (packing.SharedRows),
    under the toolkit's cache; those of processes no longer running on this machine are removed first
    (a run killed with -9 leaves its own)."""

    root = cache_root() / "rows"
    host = socket.gethostname()
    for old in root.glob(f"{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{host}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def make_collator(recipe: Recipe, family: Family, processor, samples: list[Sample], lengths: list[int], rope,
                  attn: str, towers=None, encodings=None, idle: list | None = None, rows: Path | None = None):
    """(the Trainer's dataset, the collator): packed bins or sample indices. The LLM's attention
    gets the packed rows' sample boundaries from the collator whenever the chosen backend (`auto`
    resolved) takes them, so no layer recomputes them (a device sync per layer on CUDA). With
    data-loader workers and `rows` (a folder), packed rows are collated once for all of them
    (packing.SharedRows), starting with those whose samples `encodings` holds already."""
    cache = collator_cache_bytes(recipe)
    t = recipe.train
    if t.method == "grpo":  # one item per prompt; its completions are sampled and packed in the step
        longest = max(lengths, default=0)
        if longest + t.grpo_max_new_tokens > recipe.data.max_tokens:
            raise ConfigError(f"train.method grpo: the longest prompt with its answer has {longest} tokens, and a "
                              f"sampled answer may add train.grpo_max_new_tokens={t.grpo_max_new_tokens}: over "
                              f"data.max_tokens={recipe.data.max_tokens}, so a completion could not be packed; "
                              "raise data.max_tokens or lower train.grpo_max_new_tokens")
        return index_dataset(len(samples)), PromptCollator(
            family, processor, samples, rope, plan_metrics(samples, recipe.eval.metric), t.grpo_group,
            recipe.data.max_tokens, with_varlen_args=attn in attention.VARLEN_ARGS, towers=towers,
            idle_prompts=[samples[i] for i in idle_indices(family, samples, lengths)] if idle else [],
            idle=idle or [])
    if recipe.data.packing:

        # dpo: samples are [c0, r0, c1, r1, ...]; each pair is packed whole, in one row
        pairs = recipe.train.method == "dpo"
        bins = (plan_pair_bins if pairs else plan_bins)(lengths, recipe.data.max_tokens)
        print(f"packing: {len(samples)} samples in {len(bins)} rows of <= {recipe.data.max_tokens} tokens "
              f"({100 * efficiency(lengths, bins, recipe.data.max_tokens):.1f}% of the budget used; rows carry "
              "no padding between samples)", flush=True)
        shared = SharedRows(rows, collator_cache_bytes(recipe, shared=True)) \
            if rows is not None and data_workers(recipe.data.num_workers) > 0 else None
        if shared is None and data_workers(recipe.data.num_workers) > 0:
            encodings = None  # each worker would grow its own copy of them: each keeps its own share instead
        collator = (PairPackedCollator if pairs else PackedCollator)(family, processor, samples, rope, with_varlen_args=attn in attention.VARLEN_ARGS,
                                  towers=towers, cache_bytes=cache, encoded=encodings, idle=idle or [], shared=shared)
        if shared is not None:
            collator.prefill(bins)  # before the workers start: the encodings of the checks are not made again
        return bin_dataset(bins), collator
    return index_dataset(len(samples)), PaddedCollator(family, processor, samples, rope, towers, cache,
                                                       encodings if data_workers(recipe.data.num_workers) == 0 else None, idle or [])


