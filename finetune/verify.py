"""`python -m finetune verify packing RECIPE`: packed vs one-by-one, on the recipe's own model.

Runs the recipe's model (with its roles applied, so the trainable parameters are the real
ones) on real samples of the recipe's data twice: all samples packed into rows, and each
sample alone. Prints the largest difference of per-token logits, of the loss (mean over all
label tokens) and of every trainable parameter's gradient, and PASS/FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.families.base import IGNORE_INDEX
from finetune.packing import pack_encoded, plan_bins


@dataclass
class PackingCheck:
    max_logit_diff: float
    loss_packed: float
    loss_single: float
    max_grad_diff: float
    n_samples: int
    n_rows: int
    tol: float

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_packed - self.loss_single)

    @property
    def passed(self) -> bool:
        return max(self.max_logit_diff, self.loss_diff, self.max_grad_diff) <= self.tol

    def format(self) -> str:
        return "\n".join([
            f"samples {self.n_samples} in {self.n_rows} packed row(s)",
            f"max |logit diff|      {self.max_logit_diff:.3e}",
            f"loss packed / single  {self.loss_packed:.6f} / {self.loss_single:.6f} (diff {self.loss_diff:.3e})",
            f"max |gradient diff|   {self.max_grad_diff:.3e}  (every trainable parameter)",
            f"tolerance {self.tol:.0e}: {'PASS' if self.passed else 'FAIL'}",
        ])


def _sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def compare_packed(model, family, processor, samples, rope, *, max_tokens: int, tol: float = 1e-5,
                   mutate=None) -> PackingCheck:
    """Packed vs one-by-one logits, loss and gradients. `mutate(batch)` lets tests break packing."""
    model.eval()  # no dropout: both passes must be the same function
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoded = [family.encode(s, processor, rope=rope) for s in samples]
    n_label = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in encoded)

    # one by one
    model.zero_grad(set_to_none=True)
    single_logits, total = [], 0.0
    for e in encoded:
        batch = family.collate_padded([e], processor.pad_id)
        labels = batch.pop("labels")[0]
        logits = model(**batch).logits[0]
        loss = _sum_loss(logits, labels) / n_label
        loss.backward()
        total += float(loss.detach())
        single_logits.append(logits.detach())
    g_single = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params}

    # packed
    model.zero_grad(set_to_none=True)
    bins = plan_bins([e.num_tokens for e in encoded], max_tokens)
    rows = [[encoded[i] for i in b] for b in bins]
    batch = pack_encoded(family, rows, processor.pad_id)
    labels = batch.pop("labels")
    if mutate is not None:
        batch = mutate(batch)
    logits = model(**batch).logits
    loss = sum(_sum_loss(logits[r], labels[r]) for r in range(len(rows))) / n_label
    loss.backward()
    g_packed = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params}
    model.zero_grad(set_to_none=True)

    worst = 0.0
    for r, b in enumerate(bins):
        o = 0
        for i in b:
            n = encoded[i].num_tokens
            worst = max(worst, float((logits[r, o:o + n].detach() - single_logits[i]).abs().max()))
            o += n
    gdiff = max((float((g_packed[n] - g_single[n]).abs().max()) for n, _ in params), default=0.0)
    return PackingCheck(max_logit_diff=worst, loss_packed=float(loss), loss_single=total, max_grad_diff=gdiff,
                        n_samples=len(samples), n_rows=len(bins), tol=tol)


def pick_mixture(samples: list, n: int = 8) -> list:
    """Up to n samples covering every modality mix present, then the rest in order."""
    chosen, seen = [], set()
    for s in samples:
        key = "+".join(sorted(s.modalities()))
        if key not in seen:
            seen.add(key)
            chosen.append(s)
    for s in samples:
        if len(chosen) >= n:
            break
        if s not in chosen:
            chosen.append(s)
    return chosen[:n]


def perturb_lora_b(model, scale: float, seed: int = 0) -> None:
    """LoRA B starts at zero, which would hide differences in A's gradient: give it random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def verify_packing(recipe, n_samples: int = 8) -> PackingCheck:
    """Load the recipe's model in float32 with its roles, and compare on its own data."""
    from finetune import adapters
    from finetune.families import family_for
    from finetune.train import prepare_data, quiet_libraries, read_split

    quiet_libraries()
    prepare_data(recipe)
    family = family_for(recipe.model.path, recipe.model.family)
    loaded = family.load(recipe, dtype=torch.float32, attn="sdpa", quantize="none")
    model, _ = adapters.apply_roles(loaded.model, family, recipe)
    perturb_lora_b(model, 0.02)
    samples, _ = read_split(recipe.data.train, recipe)
    picked = pick_mixture(samples, n_samples)
    return compare_packed(model, family, loaded.processor, picked, family.rope_index(loaded.model),
                          max_tokens=recipe.data.max_tokens)
