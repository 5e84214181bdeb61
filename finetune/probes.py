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


def to_model(batch: dict, model, family) -> dict:
    """A collated batch on the model's device, every tensor of it (lists and dicts of tensors too,
    e.g. per-sample audio features); the family's floating media (`Family.float_media`) in the
    model's dtype, everything else (ids, masks, grids) in its own."""
    dev = next(model.parameters()).device
    dtype = model.dtype if hasattr(model, "dtype") else torch.float32

    def move(v, cast):
        if torch.is_tensor(v):
            return v.to(dev, dtype=dtype if cast and v.is_floating_point() else None)
        if isinstance(v, (list, tuple)):
            return type(v)(move(x, cast) for x in v)
        if isinstance(v, dict):
            return {k: move(x, cast) for k, x in v.items()}
        return v

    return {k: move(v, k in family.float_media) for k, v in batch.items()}


@torch.no_grad()
def probe_logits(model, family, processor, probes, rope, amp=contextlib.nullcontext) -> list[torch.Tensor]:
    """Logits of each probe sample alone, in float32 (the forward inside `amp()`, e.g. autocast)."""
    model.eval()
    out = []
    for s in probes:
        enc = family.encode(s, processor, rope=rope)
        batch = family.collate_padded([enc], processor.pad_id)
        batch.pop("labels")
        batch = to_model(batch, model, family)
        with amp():
            out.append(model(**batch).logits[0].float())
    return out


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling at `temperature` (no top-k or
    top-p cut) with one random stream per row, seeded by `seeds`: each step draws one uniform u per
    row and picks the first token whose cumulative softmax(logits / T) probability exceeds u
    (inverse-CDF sampling, in float64), returned as the only finite score so that greedy decoding
    takes it. A row's answer then depends on its own seed and prompt only, not on the rows beside
    it nor on the global random state: GRPO's rollouts are the same under any number of
    processes, batch composition or a resume (finetune.rollout). One random number per row and
    token, not a vocabulary's worth (as the Gumbel-max trick would draw)."""

    def __init__(self, temperature: float, seeds: list[int]):
        self.temperature, self.seeds, self.gens = temperature, seeds, None

    def __call__(self, input_ids, scores):
        if self.gens is None:  # on the logits' device: no host copy per token
            self.gens = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        if scores.shape[0] != len(self.gens):
            raise ValueError(f"SeededSampler: {scores.shape[0]} rows but {len(self.gens)} seeds")
        u = torch.cat([torch.rand(1, generator=g, device=scores.device, dtype=torch.float64) for g in self.gens])
        cdf = torch.softmax(scores.double() / self.temperature, dim=-1).cumsum(-1)
        # the first token whose cumulative probability exceeds u (right=True: never a zero-probability one)
        token = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=scores.shape[-1] - 1)
        out = torch.full(scores.shape, float("-inf"), dtype=torch.float32, device=scores.device)
        return out.scatter_(1, token, 0.0)


@torch.no_grad()
def generate(model, family, processor, samples, rope, *, max_new_tokens: int, batch_size: int,
             amp=contextlib.nullcontext, streamer=None, temperature: float = 0.0,
             seeds: list[int] | None = None) -> list[str]:
    """Greedy answers for each sample's prompt (its conversation without the last answer), or with
    `temperature` > 0 answers sampled from the model's distribution at that temperature (no top-k
    or top-p cut: GRPO's rollouts, finetune.rollout), each sample's from its own random stream when
    `seeds` (one per sample) are given (SeededSampler), else from the global one; the
    model runs inside `amp()` (autocast for a 16-bit base beside fp32 trained weights). A
    `streamer` (transformers' streamer protocol, batch_size 1: chat and serve) is handed each new
    token as it comes; the answers returned are the same with or without one."""
    model.eval()
    outs: list[str] = []
    eos = [processor.eos_id]
    if seeds is not None and len(seeds) != len(samples):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(samples)} samples")
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        if temperature > 0 and seeds is not None:
            from transformers import LogitsProcessorList

            sampling = {"do_sample": False,
                        "logits_processor": LogitsProcessorList([SeededSampler(temperature, seeds[i: i + batch_size])])}
        enc = [family.encode(s, processor, for_generation=True, rope=rope) for s in chunk]
        batch = family.collate_padded(enc, processor.pad_id, side="left")
        batch.pop("labels", None)
        batch = to_model(batch, model, family)
        with amp():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos, **sampling,
                                 pad_token_id=processor.pad_id, use_cache=True,
                                 **({"streamer": streamer} if streamer is not None else {}))
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
