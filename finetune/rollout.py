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


def roll_out(model, family, processor, prompts: list[Sample], plans: list[dict], rope, *, group: int,
             temperature: float, max_new_tokens: int, format_reward: float = 0.0,
             amp=contextlib.nullcontext) -> Rollout:
    """Sample `group` answers to each prompt in one left-padded batch (the model's train/eval mode
    is restored), reward each, and build the conversations the loss scores."""
    was_training = model.training
    expanded = [p for p in prompts for _ in range(group)]
    try:
        answers = generate(model, family, processor, expanded, rope, max_new_tokens=max_new_tokens,
                           batch_size=len(expanded), amp=amp, temperature=temperature)
    finally:
        model.train(was_training)
    rewards = [reward(plans[k // group], a, format_reward) for k, a in enumerate(answers)]
    return Rollout(answers, [completion_sample(s, a) for s, a in zip(expanded, answers)],
                   torch.tensor(rewards, dtype=torch.float32))
