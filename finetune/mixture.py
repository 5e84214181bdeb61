"""Data mixtures: how many of each source's samples go into one epoch, seeded.

`data.train` may list several sources (domain data and a share of general instruction data
against forgetting). Each source gets a token budget per epoch:

- a source with `epochs: e` contributes e times its own tokens (0.25: a seeded quarter of it,
  2: every sample twice);
- the sources with a `weight` share what they hold together (the sum of their tokens) in
  proportion to their weights: weights 3 and 1 give 75% and 25% of those tokens, the smaller
  source repeated and the larger one subsampled as needed.

A budget is met with whole copies of the source first, then samples in a seeded random order
while the total stays closest to the budget. The selection is made once per run from
`train.seed` (the packed rows are planned from it, and the Trainer's sampler shuffles the rows
each epoch), so a resumed run trains the same rows in the same order. The shares are tokens of
the packed rows, the tokens each step runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune import fsutil

__all__ = ["Share", "select", "format_shares", "write_shares"]


@dataclass
class Share:
    """One source's part of an epoch."""

    name: str
    samples: int  # usable samples the source holds
    tokens: int  # their tokens
    picked: int  # samples in the epoch (repeats counted)
    picked_tokens: int
    target_tokens: float

    def as_dict(self, total: int) -> dict:
        return {"name": self.name, "samples": self.samples, "tokens": self.tokens, "epoch_samples": self.picked,
                "epoch_tokens": self.picked_tokens, "target_tokens": round(self.target_tokens, 1),
                "share": self.picked_tokens / total if total else 0.0}


def _pick(lengths: list[int], target: float, rng: np.random.Generator) -> list[int]:
    """Indices (with repeats) whose tokens come closest to `target`: whole copies, then a seeded order."""
    total = sum(lengths)
    if total == 0 or target <= 0:
        return []
    copies = int(target // total)
    out = list(range(len(lengths))) * copies
    have = copies * total
    for i in rng.permutation(len(lengths)).tolist():
        if abs(have + lengths[i] - target) >= abs(have - target):
            break  # one more sample would overshoot by more than we are short
        out.append(i)
        have += lengths[i]
    return out


def select(sources: list, lengths: list[list[int]], seed: int) -> tuple[list[list[int]], list[Share]]:
    """Per source, the indices of its samples (with repeats) in one epoch, and the shares.

    `sources` are recipe DataSources (weight, epochs, label); `lengths[i]` the token counts of
    source i's usable samples. One source (or none with a weight given) keeps every sample once.
    """
    rng = np.random.default_rng(seed)
    totals = [sum(ls) for ls in lengths]
    weighted = [i for i, s in enumerate(sources) if s.epochs is None]
    pool = sum(totals[i] for i in weighted)
    weight_sum = sum(sources[i].weight for i in weighted)
    picks, shares = [], []
    for i, (src, ls) in enumerate(zip(sources, lengths)):
        sub = np.random.default_rng(rng.integers(2 ** 63))  # one stream per source: adding one moves no other
        if len(sources) == 1 and src.epochs is None:
            idx, target = list(range(len(ls))), float(totals[i])
        else:
            target = src.epochs * totals[i] if src.epochs is not None else pool * src.weight / weight_sum
            idx = _pick(ls, target, sub)
        picks.append(idx)
        shares.append(Share(src.label, len(ls), totals[i], len(idx), sum(ls[j] for j in idx), target))
    return picks, shares


def format_shares(shares: list[Share]) -> str:
    total = sum(s.picked_tokens for s in shares)
    lines = ["mixture (tokens per epoch):",
             f"  {'source':<32} {'samples':>8} {'in epoch':>9} {'tokens':>10} {'share':>7} {'target':>7}"]
    target_total = sum(s.target_tokens for s in shares) or 1
    for s in shares:
        lines.append(f"  {s.name[-32:]:<32} {s.samples:>8} {s.picked:>9} {s.picked_tokens:>10} "
                     f"{100 * s.picked_tokens / max(total, 1):>6.1f}% {100 * s.target_tokens / target_total:>6.1f}%")
    return "\n".join(lines)


def write_shares(run_dir: Path, shares: list[Share], seed: int) -> Path:
    """mixture.json in the run folder: the seed and each source's share (written atomically)."""
    total = sum(s.picked_tokens for s in shares)
    return fsutil.atomic_write_json(Path(run_dir) / "mixture.json", {
        "seed": seed, "epoch_tokens": total, "sources": [s.as_dict(total) for s in shares]}, indent=2)
