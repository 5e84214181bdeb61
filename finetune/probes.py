"""Probe passes shared by evaluation, export and the check before training.

`generate` is evaluation's greedy answering of left-padded batches; `probe_logits` is the
export's forward of one sample per modality mix; `preflight` runs both on the training model
before the first step, so a generation path that cannot work (a library release that changed
how media reach the decoding steps, say) stops the run in seconds, not after hours of training.
"""

from __future__ import annotations

import contextlib

import torch


def pick_probes(samples: list, max_probes: int = 8) -> list:
    """One sample per modality mix present in the data (text, image, audio, video, mixes)."""
    seen: dict[str, object] = {}
    for s in samples:
        key = "+".join(sorted(s.modalities()))
        if key not in seen:
            seen[key] = s
        if len(seen) >= max_probes:
            break
    return list(seen.values())


@torch.no_grad()
def probe_logits(model, family, processor, probes, rope, amp=contextlib.nullcontext) -> list[torch.Tensor]:
    """Logits of each probe sample alone, in float32 (the forward inside `amp()`, e.g. autocast)."""
    model.eval()
    out = []
    for s in probes:
        enc = family.encode(s, processor, rope=rope)
        batch = family.collate_padded([enc], processor.pad_id)
        batch.pop("labels")
        with amp():
            out.append(model(**batch).logits[0].float())
    return out


@torch.no_grad()
def generate(model, family, processor, samples, rope, *, max_new_tokens: int, batch_size: int,
             amp=contextlib.nullcontext) -> list[str]:
    """Greedy answers for each sample's prompt (its conversation without the last answer); the
    model runs inside `amp()` (autocast for a 16-bit base beside fp32 trained weights)."""
    model.eval()
    dev = next(model.parameters()).device
    outs: list[str] = []
    eos = [processor.eos_id]
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        enc = [family.encode(s, processor, for_generation=True, rope=rope) for s in chunk]
        batch = family.collate_padded(enc, processor.pad_id, side="left")
        batch.pop("labels", None)
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        for key in family.float_media:  # the media the model takes in its own dtype
            if torch.is_tensor(batch.get(key)):
                batch[key] = batch[key].to(model.dtype if hasattr(model, "dtype") else torch.float32)
        with amp():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=processor.pad_id, use_cache=True)
        new = gen[:, batch["input_ids"].shape[1]:]
        outs.extend(processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    return [o.strip() for o in outs]


def preflight(model, family, processor, samples, rope, *, max_new_tokens: int = 2,
              amp=contextlib.nullcontext) -> list:
    """Generate a few tokens for one left-padded batch holding one sample of each modality mix
    and run the export's probe forward on each: what evaluation and export will do after
    training. Returns the probes; the model's train/eval mode is restored. Greedy and under
    no_grad: no random state is consumed, so a resumed run continues identically."""
    probes = pick_probes(samples)
    if not probes:
        return probes
    was_training = model.training
    try:
        generate(model, family, processor, probes, rope, max_new_tokens=max_new_tokens, batch_size=len(probes),
                 amp=amp)
        probe_logits(model, family, processor, probes, rope, amp=amp)
    finally:
        model.train(was_training)
    return probes
