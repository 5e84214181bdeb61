"""GRPO's rollouts (layer 5): G answers sampled for each prompt with the model's own `generate`
(batched, with its cache; finetune.probes), each rewarded by the evaluation's metric for its
sample (finetune.metrics: choice, yesno, exact or open F1, against the sample's reference), and
each turned back into a conversation (the prompt, then the sampled answer as the assistant's
last turn) for the packed loss (finetune.grpo).

The sample's own last answer is the reference the reward checks, never trained on: the model
learns only from what it sampled. Earlier assistant turns of a multi-turn prompt are context.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from dataclasses import dataclass

import torch

from finetune import metrics
from finetune.data.schema import Message, Part, Sample
from finetune.probes import generate


def completion_sample(sample: Sample, answer: str) -> Sample:
    """The sample's prompt (its conversation without the last answer) answered by `answer`;
    earlier assistant turns are kept as context, not learned."""
    context = [copy.copy(m) for m in sample.messages]
    while context and context[-1].role == "assistant":  # the prompt that generation answers (chat_turns)
        context.pop()
    for m in context:
        if m.role == "assistant":
            m.loss = False
    return Sample(messages=context + [Message("assistant", [Part("text", text=answer)])], answer=sample.answer,
                  id=sample.id, task=sample.task, source=sample.source, line=sample.line, meta=sample.meta)


def readable(plan: dict, answer: str) -> bool:
    """Whether the metric can read an answer at all (the format reward): yes or no first for
    yesno, one of the options for choice, a non-empty first sentence otherwise."""
    m = plan["metric"]
    if m == "yesno":
        return metrics.yes_or_no(answer) is not None
    if m == "choice":
        return metrics.chosen_option(answer, plan["options"]) is not None
    return bool(metrics.normalise(metrics.first_sentence(answer)))


def reward(plan: dict, answer: str, format_reward: float = 0.0) -> float:
    """The metric's score of `answer` (metrics.score_one), plus `format_reward` if it is readable."""
    r = metrics.score_one(plan["metric"], answer, plan["reference"], plan["options"])["score"]
    return float(r) + (format_reward if format_reward and readable(plan, answer) else 0.0)


@dataclass
class Rollout:
    """A step's rollouts: per completion (the G of a prompt consecutive) its answer, its
    conversation for the loss and its reward."""

    answers: list[str]
    samples: list[Sample]
    rewards: torch.Tensor


def completion_seeds(prompts: list[Sample], group: int, seed: int, step: int) -> list[int]:
    """One random seed per completion, from the run's seed, the optimizer step, the sample's
    identity (its file name, line, id and prompt) and the completion's number within its group: a rollout is
    then the same whichever rank, micro-batch or resumed process draws it."""
    out = []
    for p in prompts:
        text = "|".join(part.text or os.path.basename(str(part.path or "")) for m in p.messages for part in m.parts)
        for k in range(group):
            key = f"{seed}|{step}|{os.path.basename(p.source)}|{p.line}|{p.id}|{text}|{k}".encode()
            out.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
    return out


def roll_out(model, family, processor, prompts: list[Sample], plans: list[dict], rope, *, group: int,
             temperature: float, max_new_tokens: int, format_reward: float = 0.0,
             amp=contextlib.nullcontext, seeds: list[int] | None = None, idle: list[Sample] = ()) -> Rollout:
    """Sample `group` answers to each prompt in one left-padded batch (the model's train/eval mode
    is restored), each from its own random stream when `seeds` are given (completion_seeds), reward
    each, and build the conversations the loss scores. `idle` prompts are answered in the same batch
    and dropped: with sharded weights every rank must run every media tower (packing.idle_media)."""
    was_training = model.training
    expanded = [p for p in prompts for _ in range(group)]
    try:
        answers = generate(model, family, processor, expanded + list(idle), rope, max_new_tokens=max_new_tokens,
                           batch_size=len(expanded) + len(idle), amp=amp, temperature=temperature,
                           seeds=None if seeds is None else list(seeds) + [0] * len(idle))[:len(expanded)]
    finally:
        model.train(was_training)
    rewards = [reward(plans[k // group], a, format_reward) for k, a in enumerate(answers)]
    return Rollout(answers, [completion_sample(s, a) for s, a in zip(expanded, answers)],
                   torch.tensor(rewards, dtype=torch.float32))
