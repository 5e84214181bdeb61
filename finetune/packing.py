"""Packing: omni-modal samples in dense rows whose samples cannot see each other.

Token counts are known before any encoder runs (`Family.count_tokens`: text tokens plus the
media tokens implied by image sizes, audio lengths and frame counts), so the bins are planned
over the whole dataset with best-fit decreasing, never cropping a sample. The Trainer then
sees one item per bin: its seeded sampler shuffles bins each epoch, gives each rank its own
bins under several processes and skips the bins already seen on resume.

A packed row carries no attention mask. Positions restart at 0 for each sample, in the layout
of `Family.packed_positions`: for M-RoPE families a [4, 1, L] tensor whose first row is the
per-sample text position and whose other rows are the sample's own t/h/w positions.
transformers builds a block-diagonal causal mask from the restarting text row (sdpa, eager,
flex) or passes the boundaries to flash-attention varlen, so every sample attends only to itself.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import fsutil
from finetune.dpo import NUM_PAIRS, PAIR_SEGMENTS
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family
from finetune.grpo import COMPLETION_SEGMENTS, NUM_COMPLETIONS
from finetune.loss import LABEL_POSITIONS, label_positions


def plan_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins of total length <= max_tokens.

    Each sample goes, longest first, into the open bin with the least room that still fits
    it (a new bin when none does). Deterministic: ties keep the original order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room_keys: list[tuple[int, int]] = []  # sorted (room, bin index)
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens > max_tokens {max_tokens}")
        pos = bisect.bisect_left(room_keys, (n, -1))
        if pos < len(room_keys):
            room, b = room_keys.pop(pos)
            bins[b].append(i)
            bisect.insort(room_keys, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(room_keys, (max_tokens - n, len(bins) - 1))
    return bins


def efficiency(lengths: list[int], rows: list[list[int]], row_len: int | None = None) -> float:
    """Real tokens / token slots, rows padded to `row_len` (or to their own longest member)."""
    real = sum(lengths[i] for r in rows for i in r)
    slots = 0
    for r in rows:
        slots += row_len if row_len is not None else sum(lengths[i] for i in r)
    return real / max(slots, 1)


def pack_encoded(family: Family, rows: list[list[EncodedSample]], pad_id: int, *,
                 with_varlen_args: bool = False, towers=None) -> dict[str, Any]:
    """Collate rows of encoded samples into a packed batch [R, L] without an attention mask.

    Rows shorter than the longest are filled with a padding segment whose positions restart
    at 0 and whose labels are ignored, so it is isolated like any other sample.
    """
    L = max(sum(e.num_tokens for e in r) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    n_rows = family.packed_positions(rows[0][0]).shape[0]
    pos = torch.zeros((n_rows, R, L), dtype=torch.long)
    seqlens: list[int] = []
    for ri, row in enumerate(rows):
        o = 0
        for e in row:
            n = e.num_tokens
            input_ids[ri, o:o + n] = e.input_ids
            lab = e.labels.clone()
            lab[0] = IGNORE_INDEX
            labels[ri, o:o + n] = lab
            pos[:, ri, o:o + n] = family.packed_positions(e)
            seqlens.append(n)
            o += n
        if o < L:
            pos[:, ri, o:L] = torch.arange(L - o)
            seqlens.append(L - o)
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels,
                           "position_ids": pos if n_rows > 1 else pos[0],
                           # no cache: transformers derives the packed mask only without one
                           "use_cache": False}
    out.update(family.collate_media([e for r in rows for e in r]))
    if towers is not None:  # the media towers' boundaries and orders, on the host (Family.tower_inputs)
        out.update(towers(out))
    if with_varlen_args:
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = max(seqlens)
    return out


REAL_TOKENS = "num_real_tokens"


def idle_indices(family: Family, samples: list, lengths: list[int]) -> list[int]:
    """The samples that stand for the data's media kinds (idle_media): for each kind the shortest
    sample with the fewest media kinds."""
    kinds = family.media_keys
    chosen: dict[str, int] = {}
    for kind in kinds:
        having = [i for i, s in enumerate(samples) if kind in s.modalities()]
        if having:
            chosen[kind] = min(having, key=lambda i: (len(samples[i].modalities() & set(kinds)), lengths[i], i))
    return sorted(set(chosen.values()))


def idle_media(family: Family, processor, samples: list, lengths: list[int], rope) -> list[EncodedSample]:
    """For each media kind of the data, one encoded sample with that kind and its labels all
    ignored, for batches that lack the kind (`with_idle_media`).

    When parameters are sharded (ZeRO-3, FSDP) a tower's forward is a collective: every rank
    gathers its weights. A rank whose batch has no image while another's has one would skip the
    vision tower, and the ranks would wait on different collectives: the known ZeRO-3 hang of
    omni models. With an idle sample every rank runs every tower once per step. It is packed as
    a sample of its own (isolated attention) with no label, so it changes no logit of the other
    samples, no loss and no gradient: its contributions are exact zeros (idle_indices chooses them)."""
    out = []
    for i in idle_indices(family, samples, lengths):
        e = family.encode(samples[i], processor, rope=rope)
        e.labels = torch.full_like(e.labels, IGNORE_INDEX)
        e.where = f"{e.where} (idle media)"
        out.append(e)
    return out


def with_idle_media(family: Family, encoded: list[EncodedSample], idle: list[EncodedSample]) -> list[EncodedSample]:
    """The idle samples (idle_media) that bring the kinds none of `encoded` has."""
    missing = {key for key in family.media_keys.values() if not any(key in e.media for e in encoded)}
    out = []
    for d in idle:
        if missing & set(d.media):
            out.append(d)
            missing -= set(d.media)
    return out


class EncodedCache:
    """Each sample encoded once, then kept for the next epochs (up to `budget` bytes of tensors).

    Encoding decodes, resizes and patchifies images, computes audio features and M-RoPE
    positions: on the CPU demo it was most of the data wait of a step, repeated every epoch for
    the same result (encoding is deterministic). Beyond the budget samples are encoded on every
    use as before. Under data-loader workers each worker keeps its own (persistent workers)."""

    def __init__(self, family: Family, processor, samples: list, rope, budget: int):
        self.family, self.processor, self.samples, self.rope, self.budget = family, processor, samples, rope, budget
        self.kept: dict[int, EncodedSample] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, i: int) -> EncodedSample:
        e = self.kept.get(i)
        if e is not None:
            self.hits += 1
            return e
        self.misses += 1
        e = self.family.encode(self.samples[i], self.processor, rope=self.rope)
        n = encoded_bytes(e)
        if self.bytes + n <= self.budget:
            self.kept[i] = e
            self.bytes += n
        return e

    def has_room(self) -> bool:
        return self.bytes < self.budget

    def offer(self, i: int, e: EncodedSample) -> bool:
        """Keep an encoding made elsewhere (the checks before step 1) if it fits the budget."""
        n = encoded_bytes(e)
        if i in self.kept or self.bytes + n > self.budget:
            return False
        self.kept[i] = e
        self.bytes += n
        return True

    def forget(self, i: int) -> None:
        e = self.kept.pop(i, None)
        if e is not None:
            self.bytes -= encoded_bytes(e)

    def reserve(self, n: int) -> bool:
        """Take n bytes of the budget for something kept elsewhere (a collated row); False if full."""
        if self.bytes + n > self.budget:
            return False
        self.bytes += n
        return True

    def __getstate__(self):  # a worker process starts with an empty cache of its own
        state = dict(self.__dict__)
        state.update(kept={}, bytes=0, hits=0, misses=0)
        return state


def tensor_bytes(x) -> int:
    """Bytes of the tensors in x (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(y) for y in x)
    if isinstance(x, dict):
        return sum(tensor_bytes(y) for y in x.values())
    return 0


def encoded_bytes(e: EncodedSample) -> int:
    """Bytes of an encoded sample's tensors (ids, labels, positions, media)."""
    return tensor_bytes([e.input_ids, e.labels, e.position_ids, e.media])


class SharedRows:
    """Packed rows collated once for every data-loader process, kept as files in a folder of the run.

    With W workers, the sampler deals each epoch's reshuffled rows across them, so a cache in each
    worker hits about 1/W of the time and ends up holding each row W times. Here whichever process
    needs a row first collates it and writes it (atomically: a temporary name, then a rename); every
    process, in every later epoch, reads it back (memory-mapped: the page cache holds it once). The
    main process writes the rows whose samples the checks before step 1 already encoded, so those
    encodings are not made again. `budget` bytes in all (data.cache_gb), counted in a counter the
    processes share; beyond it rows are collated on every use, as without a cache."""

    def __init__(self, folder: Path, budget: int):
        import multiprocessing

        self.folder, self.budget = Path(folder), budget
        self.used = multiprocessing.Value("q", 0)  # shared with the workers (fork and spawn alike)
        self.hits = self.misses = 0

    def path(self, key: tuple) -> Path:
        return self.folder / (hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest() + ".pt")

    def get(self, key: tuple) -> dict | None:
        try:
            batch = torch.load(self.path(key), mmap=True, weights_only=True)
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        return batch

    def put(self, key: tuple, batch: dict) -> bool:
        n = tensor_bytes(batch)
        with self.used.get_lock():
            if self.used.value + n > self.budget:
                return False
            self.used.value += n
        with fsutil.atomic_path(self.path(key)) as tmp:
            torch.save(batch, tmp)
        return True


@dataclass
class PackedCollator:
    """Trainer collator: each feature is one bin (sample indices); one packed row per bin."""

    family: Family
    processor: Any
    samples: list
    rope: Any
    with_varlen_args: bool = False
    towers: Any = None
    cache_bytes: int = 0  # encoded samples kept between epochs (EncodedCache)
    encoded: Any = None  # an EncodedCache already filled (by the checks before step 1), else a new one
    stats: dict = field(default_factory=lambda: {"rows": 0, "tokens": 0, "slots": 0})
    idle: list = field(default_factory=list)  # idle_media: every tower runs on every rank (sharded weights)
    shared: SharedRows | None = None  # rows shared by the data-loader workers (SharedRows), else kept here

    def __post_init__(self):
        if self.encoded is None:
            self.encoded = EncodedCache(self.family, self.processor, self.samples, self.rope, self.cache_bytes)
        self.rows: dict[tuple, dict] = {}  # one-row batches, collated once (a bin's samples never change)

    def __getstate__(self):  # a worker process starts with empty caches of its own
        state = dict(self.__dict__)
        state["rows"] = {}
        return state

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        key = tuple(features[0]["bin"]) if len(features) == 1 else None
        if key is not None:
            batch = self.rows.get(key) if self.shared is None else self.shared.get(key)
            if batch is not None:
                batch = dict(batch)
                self._count(batch)
                return batch
        batch = self.collate(features)
        self._count(batch)
        if key is not None:
            self.keep(key, batch)
        return batch

    def prefill(self, bins: list[list[int]]) -> int:
        """Collate now the rows whose samples are all encoded already (by the checks before step 1)
        and keep them for every process; returns how many."""
        done = 0
        for b in bins:
            key = tuple(b)
            if all(i in self.encoded.kept for i in key) and self.keep(key, self.collate([{"bin": b}])):
                done += 1
        return done

    def keep(self, key: tuple, batch: dict) -> bool:
        """Keep a one-row batch instead of its samples' encodings (each sample is in one bin only)."""
        if self.shared is not None:
            kept = self.shared.put(key, batch)
            for i in key:
                self.encoded.forget(i)
            return kept
        if not all(i in self.encoded.kept for i in key):
            return False
        for i in key:
            self.encoded.forget(i)
        if self.encoded.reserve(tensor_bytes(batch)):
            self.rows[key] = dict(batch)
            return True
        return False

    def collate(self, features: list[dict]) -> dict[str, Any]:
        """One packed batch of the features' bins, encoding what is not kept."""
        return self.pack_rows([[self.encoded(i) for i in f["bin"]] for f in features])

    def pack_rows(self, rows: list[list[EncodedSample]]) -> dict[str, Any]:
        """One packed batch of rows of encoded samples, with the idle media, token count and label positions."""
        real = sum(e.num_tokens for r in rows for e in r)
        rows[-1] = rows[-1] + with_idle_media(self.family, [e for r in rows for e in r], self.idle)
        batch = pack_encoded(self.family, rows, self.processor.pad_id, with_varlen_args=self.with_varlen_args,
                             towers=self.towers)
        batch[REAL_TOKENS] = real  # a host int for the trainer's count
        batch[LABEL_POSITIONS] = label_positions(batch["labels"])  # the loss's head runs there only (no host read)
        return batch

    def _count(self, batch: dict) -> None:
        self.stats["rows"] += batch["input_ids"].shape[0]
        self.stats["tokens"] += batch[REAL_TOKENS]
        self.stats["slots"] += batch["input_ids"].numel()


def pair_samples(samples: list) -> list:
    """Preference pairs as plain samples, each pair's chosen then its rejected: [c0, r0, c1, r1, ...]."""
    return [x for s in samples for x in (s.chosen_sample(), s.rejected_sample())]


def plan_pair_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Bins of the pair_samples() indices: each pair (2k, 2k + 1) whole in one bin, by best-fit
    decreasing over the pairs' total lengths, chosen before rejected within a bin."""
    pairs = plan_bins([lengths[2 * k] + lengths[2 * k + 1] for k in range(len(lengths) // 2)], max_tokens)
    return [[i for k in b for i in (2 * k, 2 * k + 1)] for b in pairs]


@dataclass
class PairPackedCollator(PackedCollator):
    """PackedCollator for preference pairs: each bin lists whole pairs (plan_pair_bins), and each
    label position gets its sample's index in the batch (finetune.dpo: 2k chosen, 2k + 1 rejected)."""

    def pack_rows(self, rows: list[list[EncodedSample]]) -> dict[str, Any]:
        owners, j = [], 0
        for row in rows:
            owners.append([(j + k, e.num_tokens) for k, e in enumerate(row)])
            j += len(row)
        batch = super().pack_rows(rows)
        batch[PAIR_SEGMENTS] = label_segments(owners, batch)
        batch[NUM_PAIRS] = j // 2
        return batch


def label_segments(owners: list[list[tuple[int, int]]], batch: dict) -> torch.Tensor:
    """For each label position of a packed batch (LABEL_POSITIONS, in order), the index of the
    sample it belongs to; `owners` gives per row its samples as (index, token count), in row order
    (a row's trailing padding and idle samples belong to none)."""
    L = batch["input_ids"].shape[1]
    owner = torch.full((len(owners), L), -1, dtype=torch.long)
    for r, row in enumerate(owners):
        o = 0
        for j, n in row:
            owner[r, o:o + n] = j
            o += n
    # the prediction at p scores the label at p + 1, which belongs to the same sample (the first
    # token of a sample is never a label)
    return owner.flatten().index_select(0, batch[LABEL_POSITIONS] + 1)


def pack_completions(family: Family, encoded: list[EncodedSample], pad_id: int, max_tokens: int, *,
                     with_varlen_args: bool = False, towers=None, idle: list | None = None) -> dict[str, Any]:
    """GRPO: the encoded completions (prompt + sampled answer, each an isolated sample) packed by
    best-fit decreasing into rows of <= max_tokens, one batch; COMPLETION_SEGMENTS gives each label
    position the index of its completion in `encoded` (finetune.grpo), whatever row and order it
    was packed in. A completion whose re-tokenised answer outgrew the budget (the train's check
    allows for grpo_max_new_tokens sampled tokens) gets a row of its own rather than stopping the run.
    `idle` (idle_media: sharded weights) brings the media kinds the completions lack, in a row of
    their own whose labels are all ignored."""
    lengths = [e.num_tokens for e in encoded]
    bins = plan_bins(lengths, max([max_tokens, *lengths]))
    rows = [[encoded[i] for i in b] for b in bins]
    owners = [[(i, encoded[i].num_tokens) for i in b] for b in bins]
    idle = with_idle_media(family, encoded, idle or [])
    if idle:
        rows.append(idle)
        owners.append([])
    batch = pack_encoded(family, rows, pad_id, with_varlen_args=with_varlen_args, towers=towers)
    batch[REAL_TOKENS] = sum(e.num_tokens for e in encoded)
    batch[LABEL_POSITIONS] = label_positions(batch["labels"])
    batch[COMPLETION_SEGMENTS] = label_segments(owners, batch)
    batch[NUM_COMPLETIONS] = len(encoded)
    return batch


def bin_dataset(bins: list[list[int]]):
    """A `datasets.Dataset` with one item per bin (what TRL's trainer iterates over)."""
    import datasets

    return datasets.Dataset.from_dict({"bin": bins})
