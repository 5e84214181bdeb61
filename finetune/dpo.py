"""The DPO loss on packed pairs (layer 2): per-sample sums of the label tokens' log-probabilities
(a segment sum over the label-token head's output, finetune.loss), then the pair losses.

A packed DPO batch holds each pair's chosen and rejected completions as two isolated samples,
chosen first, pairs in order: sample 2k is pair k's chosen, 2k + 1 its rejected. The collator
gives each label position the index of its sample (`PAIR_SEGMENTS`), so the sequence
log-probability of sample j is the sum of the label tokens whose segment is j: exactly what a
forward of that sample alone gives, whatever row it was packed in.

The losses follow the definitions of TRL's DPOTrainer (trl 1.16, `_compute_loss`): sigmoid
(Rafailov et al.: -log sigmoid(beta * margin)) and ipo (Azar et al., Eq. 17, with the log-ratios
averaged per completion token, as TRL does); the rewards are beta times the policy/reference
log-ratios. TRL computes them inside its trainer on [chosen; rejected] padded batches, which
cannot hold our packed omni rows, so the arithmetic is written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the collator's key: for each label position, the index of its sample in the batch (2k chosen, 2k + 1 rejected)
PAIR_SEGMENTS = "pair_segments"
#: the collator's key: the number of pairs in the batch (a host int)
NUM_PAIRS = "num_pairs"
LOSS_TYPES = ("sigmoid", "ipo")


def segment_sums(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """Sum `values` [K] into `n` bins by `segments` [K] (float32)."""
    out = torch.zeros(n, dtype=torch.float32, device=values.device)
    return out.index_add(0, segments.to(values.device), values.float())


@dataclass
class PairScores:
    """Per pair: the loss and the implicit rewards (beta times the policy/reference log-ratio)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Sums over the pairs (divided by the pair count when logged): rewards, margin, accuracy."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {"rewards/chosen": self.chosen_rewards.sum(), "rewards/rejected": self.rejected_rewards.sum(),
                "rewards/margins": margins.sum(), "rewards/accuracies": (margins > 0).float().sum()}


def pair_scores(logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor, beta: float,
                loss_type: str = "sigmoid") -> PairScores:
    """The pair losses from the per-sample sequence log-probabilities of the policy and the
    reference ([2P], chosen and rejected interleaved) and each sample's label-token count [2P]."""
    ratios = (logps - ref_logps).view(-1, 2)
    chosen, rejected = ratios[:, 0], ratios[:, 1]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        n = counts.to(ratios.device).float().clamp(min=1).view(-1, 2)
        losses = (chosen / n[:, 0] - rejected / n[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return PairScores(losses, beta * chosen.detach(), beta * rejected.detach())
