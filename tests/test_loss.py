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
    from finetune import adapters, attention, collate
    from finetune import trainer as trainer_mod
    from finetune.data import reading
    from finetune.families import family_for
    from finetune.verify import perturb_lora_b

    tmp = tmp_path_factory.mktemp("loss")
    recipe = tiny_recipe(tmp, small_demo)
    family = family_for(recipe.model.path)
    loaded = trainer_mod.load_for_training(recipe, family, "fp32")
    samples, lengths = reading.prepare_split(reading.read_split(recipe.data.train, recipe)[0], family, loaded, recipe, [])
    attention.apply_to_llm(loaded.model, "varlen")
    attention.apply_to_encoders(loaded.model, family)
    model, _ = adapters.apply_roles(loaded.model, family, recipe)
    perturb_lora_b(model, 0.05)
    ds, collator = collate.make_collator(recipe, family, loaded.processor, samples, lengths, family.rope_index(loaded.model),
                                   "varlen", family.tower_inputs(loaded.model))
    trainer = trainer_mod.make_trainer(recipe, family, model, loaded.processor, ds, collator, "fp32", tmp / "run", [])
    batch = collator([ds[0], ds[1]])
    return trainer, model, batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_token_mean_loss_equals_the_models_own_cross_entropy(trainer_and_batch, path, monkeypatch):
    from finetune import trainer as T

    trainer, model, batch = trainer_and_batch
    model.train()
    for m in model.modules():  # no dropout: both passes must be the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    labels = batch["labels"]
    n = (labels[:, 1:] != -100).sum()

    model.zero_grad(set_to_none=True)
    from finetune.loss import LABEL_POSITIONS
    from finetune.packing import REAL_TOKENS

    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", REAL_TOKENS, LABEL_POSITIONS)}).logits
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


@pytest.mark.slow
def test_the_chunked_heads_peak_memory_is_below_the_full_logits():
    sys.path.insert(0, str(ROOT / "bench"))
    import loss_memory

    vocab, tokens, hidden = 152064, 1024, 64  # Qwen2.5-Omni's vocabulary: 594 MB of fp32 logits
    plain = loss_memory.measure("plain", tokens, hidden, vocab, "cpu", repeats=1)
    chunked = loss_memory.measure("chunked", tokens, hidden, vocab, "cpu", repeats=1)
    assert chunked["peak_mb"] < plain["peak_mb"] - 200, (plain, chunked)
    dl, dg = loss_memory.difference(256, hidden, vocab, "cpu")
    assert dl <= 1e-5 and dg <= 1e-5


def test_label_positions_are_where_the_next_token_is_a_label():
    from finetune.loss import label_positions

    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, -100, 8, -100]])
    flat = label_positions(labels)
    assert flat.tolist() == [0, 1, 3, 7]  # row 0: p = 0, 1, 3 (labels at 1, 2, 4); row 1: p = 2 (label at 3)
    assert labels.reshape(-1)[flat + 1].tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_label_head_equals_trls_fused_head_without_a_host_read(trainer_and_batch, precision, monkeypatch):
    """The label-token head (positions from the collator) gives TRL's fused head's loss and
    gradients bit for bit, in fp32 and under bf16 autocast, and reads nothing back from the device
    (TRL's boolean mask runs nonzero: one host wait per micro-batch on a GPU)."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    from finetune.loss import LABEL_POSITIONS
    from finetune.packing import REAL_TOKENS
    from sync_counter import counting

    trainer, model, batch = trainer_and_batch
    model.train()
    inputs = {k: v for k, v in batch.items() if k not in (REAL_TOKENS, LABEL_POSITIONS)}
    positions = batch[LABEL_POSITIONS]
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    base = model.get_base_model()
    ours = base.forward

    model.zero_grad(set_to_none=True)
    backbone = {"backbone": [base.base_model]}  # the model's own syncs are counted apart (test_host_syncs)
    with counting(backbone) as c, amp:
        out = model(**inputs, label_positions=positions)
        mine_tokens = out.log_probs
        mine = -mine_tokens.sum()
    mine.backward()
    g_mine = _grads(model)
    assert {k: n for k, n in c.seen.items() if k[0] != "backbone"} == {}

    import trl.trainer.utils as trl_utils

    # TRL selects the label rows with a boolean mask on CUDA (compact), scores every row elsewhere;
    # its compact path fails under CPU autocast (a bf16 result scattered into fp32), so bf16 is
    # compared with its every-row path
    compact = precision == "fp32"
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)
    base.forward = types.MethodType(type(base).forward, base)  # the original forward, then TRL's head on it
    add_fused_lm_head(base, outputs=("log_probs",))
    try:
        model.zero_grad(set_to_none=True)
        with counting(backbone) as c_trl, amp:
            ref_tokens = model(**inputs, fused_lm_head=True).log_probs  # [B, T] at the label token, zeros elsewhere
            ref = -ref_tokens.sum()
        ref.backward()
    finally:
        base.forward = ours
    g_ref = _grads(model)
    assert g_mine.keys() == g_ref.keys()
    if compact:
        assert c_trl.seen[("glue", "index(bool mask)")] > 0  # the counter sees TRL's mask (the control)
        # the label tokens' log-probabilities bit for bit (as sets: TRL lays its compact rows out in its own
        # order); the two sums reduce a [K] and a zero-padded [B, T] tensor in different orders, so they agree
        # to fp32 rounding only
        theirs = ref_tokens.detach()[ref_tokens.detach() != 0]
        assert torch.equal(mine_tokens.detach().sort().values, theirs.sort().values)
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=0)
        assert all(torch.equal(g_mine[k], g_ref[k]) for k in g_mine)
    else:  # the same rows in other GEMM tile shapes
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=0)
        for k in g_mine:
            torch.testing.assert_close(g_mine[k], g_ref[k], rtol=1e-4, atol=1e-6)


def test_the_label_head_runs_the_familys_backbone_and_head(trainer_and_batch):
    """The head runs the (backbone, lm_head) that `Family.label_head_parts` gives (a composite model
    without transformers' base model gives its own): the default parts' log-probabilities, through
    the backbone the hook returned."""
    from finetune.loss import LABEL_POSITIONS, add_label_head
    from finetune.packing import REAL_TOKENS

    trainer, model, batch = trainer_and_batch
    model.eval()
    inputs = {k: v for k, v in batch.items() if k not in (REAL_TOKENS, LABEL_POSITIONS)}
    positions = batch[LABEL_POSITIONS]
    base = model.get_base_model()
    ours = base.forward
    with torch.no_grad():
        want = model(**inputs, label_positions=positions).log_probs
    calls = []

    def parts(m):
        def backbone(*args, **kwargs):
            calls.append(len(args) + len(kwargs))
            return m.base_model(*args, **kwargs)

        return backbone, m.get_output_embeddings()

    add_label_head(base, parts)
    try:
        with torch.no_grad():
            got = model(**inputs, label_positions=positions).log_probs
    finally:
        base.forward = ours
    assert len(calls) == 1
    assert torch.equal(got, want)
