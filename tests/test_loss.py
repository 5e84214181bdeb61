"""The training loss: the trainer's token-mean loss (plain cross-entropy on small logits off CUDA,
TRL's chunked LM head otherwise) equals the cross-entropy of the model's own logits, gradients
included, and the chunked head's peak memory is below the full logits'."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, tiny_recipe


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory, small_demo):
    from finetune import adapters, attention
    from finetune import train as T
    from finetune.families import family_for
    from finetune.verify import perturb_lora_b

    tmp = tmp_path_factory.mktemp("loss")
    recipe = tiny_recipe(tmp, small_demo)
    family = family_for(recipe.model.path)
    loaded = T.load_for_training(recipe, family, "fp32")
    samples, lengths = T.prepare_split(T.read_split(recipe.data.train, recipe)[0], family, loaded, recipe, [])
    attention.apply_to_llm(loaded.model, "varlen")
    attention.apply_to_encoders(loaded.model, family)
    model, _ = adapters.apply_roles(loaded.model, family, recipe)
    perturb_lora_b(model, 0.05)
    ds, collator = T.make_collator(recipe, family, loaded.processor, samples, lengths, family.rope_index(loaded.model),
                                   "varlen", family.tower_inputs(loaded.model))
    trainer = T.make_trainer(recipe, family, model, loaded.processor, ds, collator, "fp32", tmp / "run", [])
    batch = collator([ds[0], ds[1]])
    return trainer, model, batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_token_mean_loss_equals_the_models_own_cross_entropy(trainer_and_batch, path, monkeypatch):
    from finetune import train as T

    trainer, model, batch = trainer_and_batch
    model.train()
    for m in model.modules():  # no dropout: both passes must be the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    labels = batch["labels"]
    n = (labels[:, 1:] != -100).sum()

    model.zero_grad(set_to_none=True)
    from finetune.packing import REAL_TOKENS

    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", REAL_TOKENS)}).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                            reduction="sum") / n
    ref.backward()
    g_ref = _grads(model)

    monkeypatch.setattr(T, "PLAIN_LOSS_MAX_LOGITS", 1 << 40 if path == "plain" else 0)
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    loss.backward()
    g = _grads(model)
    assert abs(float(loss) - float(ref)) <= 1e-5
    assert g.keys() == g_ref.keys() and g
    assert max(float((g[k] - g_ref[k]).abs().max()) for k in g) <= 1e-5


def test_the_chunked_heads_peak_memory_is_below_the_full_logits():
    sys.path.insert(0, str(ROOT / "bench"))
    import loss_memory

    vocab, tokens, hidden = 152064, 1024, 64  # Qwen2.5-Omni's vocabulary: 594 MB of fp32 logits
    plain = loss_memory.measure("plain", tokens, hidden, vocab, "cpu", repeats=1)
    chunked = loss_memory.measure("chunked", tokens, hidden, vocab, "cpu", repeats=1)
    assert chunked["peak_mb"] < plain["peak_mb"] - 200, (plain, chunked)
    dl, dg = loss_memory.difference(256, hidden, vocab, "cpu")
    assert dl <= 1e-5 and dg <= 1e-5
