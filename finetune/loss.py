"""The LM head on label tokens only, at positions the collator found on the host.

A causal LM's loss needs the logits where the next token is a label: in an omni-modal row most
tokens are image, audio or prompt tokens, so projecting every token through a vocabulary of 150k+
wastes time and (as fp32 logits) memory. TRL's fused head selects those positions with a boolean
mask on the device, which makes the host wait for the device once per micro-batch (the mask's
count sizes the result). Here the collator, which built the labels on the host, hands over the flat
positions (`label_positions`), so the selection is an `index_select` of a size known in advance:
no host read. The projection and log-softmax run in TRL's `ChunkedLogProbFunction` tiles (a
Triton kernel on CUDA; never the [tokens, vocabulary] logits).

`add_label_head(model)` patches the (unwrapped) model's forward, so the call still goes through
PEFT, DDP and the engines' wrappers: `model(**batch, label_positions=p)` returns a
`LabelHeadOutput` with the label tokens' log-probabilities (and the MoE router logits when asked).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
LABEL_POSITIONS = "label_positions"
#: vocabulary columns per tile of TRL's chunked log-probability function
CHUNK = 32768


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum over label tokens of -log p(label) with the causal shift (position p predicts the
    label at p + 1), in float32: logits [..., L, V], labels [..., L]. The one cross-entropy of the
    package: the trainer's loss on small logits, evaluation's token loss, verify's comparison."""
    return torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Host: the flat positions `r * L + p` of a [R, L] batch whose next token (r, p + 1) is a label
    (the prediction at p scores the label at p + 1, within the same row)."""
    R, L = labels.shape
    r, p = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return r * L + p


@dataclass
class LabelHeadOutput:
    """What the patched forward returns for `label_positions`: per label token, in position order."""

    log_probs: torch.Tensor  # [K] float32
    router_logits: Any = None
    aux_loss: Any = None  # the load-balancing loss, where the backbone's forward computes it


def _head_weight(lm_head):
    """(weight, bias) of the output projection as one matrix, or None when it is not a plain
    projection (a LoRA-adapted head: the caller then runs the module itself on the label rows)."""
    if hasattr(lm_head, "lora_A"):
        return None
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if hasattr(weight, "ds_id") and any(p is not None and p.requires_grad for p in (weight, bias)):
        # a trained head under ZeRO-3: its gradient can only be accumulated while the module's own
        # backward hooks hold it gathered, which a weight read past the module never arms (measured:
        # "size of tensor a (0) must match ... 64" in backward); the module runs on the label rows
        return None
    if hasattr(weight, "full_tensor"):
        # FSDP2 still holds it sharded: gathering it here (DTensor.full_tensor) would leave each rank
        # only its own rows' gradient; the trainer has FSDP gather it first (engines.fsdp_forward)
        raise RuntimeError("the LM head is still sharded by FSDP2 when the loss reads it; gather it first "
                           "(FSDPModule.unshard) so that its gradient is reduced across ranks")
    return weight, bias


def label_log_probs(hidden: torch.Tensor, lm_head, targets: torch.Tensor, *, softcap: float | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """log p(target) for each row of `hidden` [K, H] through `lm_head` (softcapping and logit
    scale as the model's config has them), in float32."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    wb = _head_weight(lm_head)
    if wb is None:
        logits = lm_head(hidden).float() * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    weight, bias = wb
    with maybe_gather_lm_head_ctx(weight, bias):
        out = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, CHUNK, softcap, scale, ("log_probs",))
    return out[0]


def add_label_head(model, parts=None) -> None:
    """Patch `model.forward` (a transformers model, before PEFT wraps it): with `label_positions`
    it runs the backbone and scores only those positions (see the module docstring); without it the
    forward is the original one (generation, the plain loss path). `parts(model)` gives (backbone,
    lm_head) (the family's `label_head_parts`); default the model's base model and output embeddings."""
    original = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None) or 1.0

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against the signature
    def forward(self, *args, label_positions=None, labels=None, **kwargs):
        if label_positions is None:
            if labels is not None:
                kwargs["labels"] = labels
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone, lm_head = parts(self) if parts is not None else (self.base_model, self.get_output_embeddings())
        out = backbone(*args, **kwargs)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1).index_select(0, label_positions + 1)
        picked = flat.index_select(0, label_positions.to(flat.device)).to(lm_head.weight.device)
        log_probs = label_log_probs(picked, lm_head, targets.to(picked.device), softcap=softcap, scale=scale)
        return LabelHeadOutput(log_probs=log_probs, router_logits=getattr(out, "router_logits", None),
                               aux_loss=getattr(out, "aux_loss", None))

    model.forward = types.MethodType(forward, model)
