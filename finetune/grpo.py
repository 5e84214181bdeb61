"""The GRPO loss on packed completions (layer 2): group-normalised advantages, the clipped
policy-ratio objective and the KL to the reference, per token, averaged over each completion's
tokens, then summed over the completions.

A GRPO step samples G completions of each prompt (finetune.rollout), scores each with a
verifiable reward (the evaluation's metrics), and packs the completions as isolated samples in
dense rows. The collator's segments give each label position the index of its completion, so
every per-completion figure is a segment sum over the label-token head's output: exactly what a
forward of that completion alone gives, whatever row it was packed in, in whatever order.

The arithmetic follows the GRPO paper (Shao et al. 2024, DeepSeekMath, Eq. 3) as TRL's
GRPOTrainer (trl 1.16, loss_type "grpo") writes it:

- advantage of completion i of a prompt: (r_i - mean(r)) / (std(r) + 1e-4) over the prompt's
  G rewards (the sample standard deviation), the same for every token of the completion;
- per token: min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) - beta * KL, with rho the ratio of
  the policy to the policy that sampled the completion and KL the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 against the reference (the model with its adapters
  disabled);
- the loss is minus that, averaged over the completion's tokens, then over the completions.

One optimisation step per rollout: the sampling policy is the policy at this step, so rho is 1 in
value (its gradient is that of logp) and clipping never fires; the clipped form is kept so that
the figures logged (clip_ratio) say so. TRL's trainer generates on padded batches and cannot hold
packed omni rows, so the arithmetic is written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.dpo import segment_sums

#: the collator's key: for each label position, the index of its completion in the batch
COMPLETION_SEGMENTS = "completion_segments"
#: the collator's key: how many completions the batch holds (a host int)
NUM_COMPLETIONS = "num_completions"
#: added to the group's standard deviation (TRL's value): a group of equal rewards gets advantage 0
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r - mean) / (std + 1e-4) within each run of `group` consecutive rewards (one prompt's
    completions), with the sample standard deviation; float32."""
    if group < 2:
        raise ValueError(f"a GRPO group needs at least 2 completions, got {group}")
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {group}")
    r = rewards.float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + ADVANTAGE_EPS)).flatten()


@dataclass
class CompletionScores:
    """Per completion: the loss and what is logged (all float32, detached but the loss)."""

    losses: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    def metrics(self, group: int) -> dict[str, torch.Tensor]:
        """Sums over the completions (divided by the completion count when logged); the spread of
        each group's rewards counted once per completion, so that it logs as the groups' mean."""
        spread = self.rewards.view(-1, group).std(1)
        return {"reward": self.rewards.sum(), "kl": self.kl.sum(), "clip_ratio": self.clipped.sum(),
                "completion_length": self.lengths.float().sum(), "advantage_abs": self.advantages.abs().sum(),
                "reward_group_std": spread.sum() * group}


def completion_scores(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, segments: torch.Tensor,
                      rewards: torch.Tensor, group: int, *, beta: float, epsilon: float) -> CompletionScores:
    """The per-completion GRPO losses from the label tokens' log-probabilities under the policy
    (with gradients), the sampling policy and the reference ([K] each, in label-position order),
    each token's completion index `segments` [K] and the completions' rewards [N] (grouped: the G
    completions of a prompt are consecutive)."""
    n = rewards.numel()
    adv = group_advantages(rewards.to(logps.device), group)
    seg = segments.to(logps.device)
    a = adv.index_select(0, seg)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    objective = torch.minimum(ratio * a, clipped_ratio * a)
    diff = ref_logps - logps
    kl = torch.exp(diff) - diff - 1
    per_token = -(objective - beta * kl) if beta else -objective
    counts = torch.bincount(seg, minlength=n).clamp(min=1).float()
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    return CompletionScores(
        losses=segment_sums(per_token, seg, n) / counts,
        kl=(segment_sums(kl.detach(), seg, n) / counts),
        clipped=segment_sums(clipped.float(), seg, n) / counts,
        lengths=torch.bincount(seg, minlength=n),
        rewards=rewards.float().to(logps.device),
        advantages=adv,
    )
