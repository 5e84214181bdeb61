"""`python -m finetune verify packing RECIPE`: packed vs one-by-one, on the recipe's own model.

Runs the recipe's model (with its roles applied, so the trainable parameters are the real
ones) on real samples of the recipe's data twice: all samples packed into rows, and each
sample alone. Prints the largest difference of per-token logits, of the loss (mean over all
label tokens) and of every trainable parameter's gradient, and PASS/FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune import adapters, attention
from finetune.data.reading import prepare_data, prepare_split, read_split
from finetune.errors import ConfigError
from finetune.families.base import IGNORE_INDEX
from finetune.loss import shifted_cross_entropy
from finetune.models import family_of, load_spec
from finetune.packing import pack_encoded, plan_bins
from finetune.probes import to_model
from finetune.runtime import choose_precision, quiet_libraries, torch_dtype


@dataclass
class PackingCheck:
    max_logit_diff: float
    loss_packed: float
    loss_single: float
    max_grad_diff: float
    n_samples: int
    n_rows: int
    tol: float
    logit_scale: float = 1.0  # max |logit| of the one-by-one pass
    grad_scale: float = 1.0  # max |gradient| of the one-by-one pass
    relative: bool = False  # low precision: differences are judged relative to these scales
    setting: str = "float32"

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_packed - self.loss_single)

    def _judged(self) -> tuple[float, float, float]:
        if not self.relative:
            return self.max_logit_diff, self.loss_diff, self.max_grad_diff
        return (self.max_logit_diff / max(self.logit_scale, 1e-12), self.loss_diff / max(abs(self.loss_single), 1e-12),
                self.max_grad_diff / max(self.grad_scale, 1e-12))

    @property
    def passed(self) -> bool:
        return max(self._judged()) <= self.tol

    def format(self) -> str:
        rl, rs, rg = (f"  (relative {x:.2e})" if self.relative else "" for x in self._judged())
        kind = "relative tolerance" if self.relative else "tolerance"
        return "\n".join([
            f"{self.setting}: samples {self.n_samples} in {self.n_rows} packed row(s)",
            f"max |logit diff|      {self.max_logit_diff:.3e}{rl}",
            f"loss packed / single  {self.loss_packed:.6f} / {self.loss_single:.6f} (diff {self.loss_diff:.3e}){rs}",
            f"max |gradient diff|   {self.max_grad_diff:.3e}{rg}  (every trainable parameter)",
            f"{kind} {self.tol:.0e}: {'PASS' if self.passed else 'FAIL'}",
        ])


def compare_packed(model, family, processor, samples, rope, *, max_tokens: int, tol: float = 1e-5,
                   mutate=None, relative: bool = False, packed_attn: str | None = None,
                   varlen_args: bool = False, towers: bool = False, setting: str = "float32") -> PackingCheck:
    """Packed vs one-by-one logits, loss and gradients. `mutate(batch)` lets tests break packing.

    In float32 differences are absolute. In bf16/fp16 (`relative=True`) each is divided by the
    scale of what it compares (largest logit, loss, largest gradient), since rounding error
    grows with the values. `packed_attn` switches the LLM's attention for the packed pass only
    (the one-by-one reference keeps the model's own); `varlen_args` adds cu_seq_lens/max_length
    to the packed batch, as the training collator does for varlen and flash-attention; `towers`
    runs the packed pass as training does: the towers' inputs from the collator and their
    attention one varlen call per layer (ENCODER_VARLEN), the reference with the towers' own.
    """

    model.eval()  # no dropout: both passes must be the same function
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoded = [family.encode(s, processor, rope=rope) for s in samples]
    n_label = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in encoded)

    # one by one
    model.zero_grad(set_to_none=True)
    single_logits, total = [], 0.0
    for e in encoded:
        batch = to_model(family.collate_padded([e], processor.pad_id), model, family)
        labels = batch.pop("labels")[0]
        logits = model(**batch).logits[0].float()
        loss = shifted_cross_entropy(logits, labels) / n_label
        loss.backward()
        total += float(loss.detach())
        single_logits.append(logits.detach())
    g_single = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params}

    # packed
    model.zero_grad(set_to_none=True)
    bins = plan_bins([e.num_tokens for e in encoded], max_tokens)
    rows = [[encoded[i] for i in b] for b in bins]
    batch = to_model(pack_encoded(family, rows, processor.pad_id, with_varlen_args=varlen_args,
                                  towers=family.tower_inputs(model) if towers else None), model, family)
    labels = batch.pop("labels")
    if mutate is not None:
        batch = mutate(batch)
    text_cfg = model.config.get_text_config()
    before = text_cfg._attn_implementation
    encoders = family.encoder_attention_configs(model) if towers else []
    before_enc = [c._attn_implementation for c in encoders]
    if packed_attn:
        attention.apply_to_llm(model, packed_attn)
    if towers:
        attention.apply_to_encoders(model, family)
    try:
        logits = model(**batch).logits.float()
    finally:
        text_cfg._attn_implementation = before
        for c, impl in zip(encoders, before_enc):
            c._attn_implementation = impl
    loss = sum(shifted_cross_entropy(logits[r], labels[r]) for r in range(len(rows))) / n_label
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
    gdiff = max((float((g_packed[n].float() - g_single[n].float()).abs().max()) for n, _ in params), default=0.0)
    gscale = max((float(g_single[n].float().abs().max()) for n, _ in params), default=1.0)
    lscale = max(float(x.abs().max()) for x in single_logits)
    return PackingCheck(max_logit_diff=worst, loss_packed=float(loss.detach()), loss_single=total, max_grad_diff=gdiff,
                        n_samples=len(samples), n_rows=len(bins), tol=tol, logit_scale=lscale, grad_scale=gscale,
                        relative=relative, setting=setting)


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


# Relative tolerance in 16-bit: a few bf16 rounding steps (its epsilon is 2^-7, about 7.8e-3).
TOL_16BIT = 3e-2


def verify_packing(recipe, n_samples: int = 8, *, device: str | None = None, dtype: str | None = None,
                   attn: str | None = None) -> PackingCheck:
    """Load the recipe's model with its roles (in `dtype`, on `device`, the LLM on `attn` for
    the packed pass) and compare packed vs one-by-one on the recipe's own data. Defaults are
    what training would use: CUDA when present, the recipe's precision and attention backend.

    The one-by-one pass always runs the LLM on SDPA with a padding mask, the reference any
    packed backend must match. float32 is held to 1e-5 absolute; bf16/fp16 to TOL_16BIT relative.
    """

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float32" if device == "cpu" else choose_precision(recipe.train.precision))
    attn = attn or attention.choose(recipe.model.attn, packing=True)
    quiet_libraries()
    attention.configure_cuda_kernels()
    prepare_data(recipe)
    family = family_of(recipe)
    dt = torch_dtype(dtype)
    loaded = family.load(load_spec(recipe, dtype=dt, attn="sdpa", quantize="none"))
    model, _ = adapters.apply_roles(loaded.model, family, recipe)
    model.to(device)
    perturb_lora_b(model, 0.02)
    # checked as training checks them: under data.on_error skip what the model cannot take is left out
    samples, skipped = read_split(recipe.data.train, recipe, on_error="skip")
    samples, _ = prepare_split(samples, family, loaded, recipe, skipped)
    if skipped and recipe.data.on_error == "raise":
        raise min(skipped, key=lambda e: (str(e.file), e.line or 0))
    if not samples:
        raise ConfigError(f"{recipe.data.train_label}: no usable samples to verify packing on")
    picked = pick_mixture(samples, n_samples)
    low = dt != torch.float32
    return compare_packed(model, family, loaded.processor, picked, family.rope_index(loaded.model),
                          max_tokens=recipe.data.max_tokens, tol=TOL_16BIT if low else 1e-5, relative=low,
                          packed_attn=attn, varlen_args=attn in attention.VARLEN_ARGS, towers=True,
                          setting=f"{dtype} on {device}, packed LLM attention {attn}, encoders {attention.ENCODER_VARLEN}")
