"""DPO on packed preference pairs: the loss and its gradients on packed rows equal those of each
completion run alone (fp32, 1e-5; bf16 autocast within a looser bound), with a control whose
broken isolation fails; the pair bins, the segment sums and the recipe's rules for the method."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from finetune.data.schema import parse_sample

BETA = 0.5


def pair(media_dir, parts, chosen, rejected, system=True):
    msgs = ([{"role": "system", "content": "You are a radiology assistant."}] if system else []) + [
        {"role": "user", "content": parts}, {"role": "assistant", "chosen": chosen, "rejected": rejected}]
    return parse_sample({"messages": msgs}, source="p.jsonl", line=1, base_dir=media_dir)


IMAGE_AUDIO = [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "a.wav"},
               {"type": "text", "text": "Is there a lesion?"}]


def pairs(media_dir):
    # media anywhere in the prompt: image and audio first, audio after the text, text only
    return [pair(media_dir, IMAGE_AUDIO, "Yes, in the left lower lobe.", "No."),
            pair(media_dir, [{"type": "text", "text": "Listen to this."}, {"type": "audio", "path": "a.wav"}],
                 "A cough.", "Music, with a long and winding melody."),
            pair(media_dir, "What does MRI stand for?", "Magnetic resonance imaging.", "Medical radio.", system=False)]


def packed(fam, loaded, flat, break_isolation=False):
    from finetune.packing import PairPackedCollator

    col = PairPackedCollator(fam, loaded.processor, flat, fam.rope_index(loaded.model))
    batch = col.collate([{"bin": list(range(len(flat)))}])
    assert batch["input_ids"].shape[0] == 1  # every completion in one row: they really share it
    if break_isolation:  # the control: positions that do not restart, so samples see each other
        pos = batch["position_ids"]
        pos[0] = torch.arange(pos.shape[-1])
    return batch


def packed_result(model, batch, loss_type, autocast=contextlib.nullcontext):
    from finetune.trainer import preference_loss

    model.zero_grad()
    with autocast():
        total, scores = preference_loss(model, batch, BETA, loss_type)
    total.backward()
    return total.detach(), scores, grads(model)


def alone_result(model, fam, loaded, flat, loss_type, autocast=contextlib.nullcontext):
    """Each completion in a batch of its own, through the model's own padded path and plain
    logits (no packing, no label head, no segment sum)."""
    from finetune.dpo import pair_scores
    from finetune.loss import shifted_cross_entropy

    model.zero_grad()
    rope = fam.rope_index(loaded.model)
    logps, refs, counts = [], [], []
    for s in flat:
        batch = fam.collate_padded([fam.encode(s, loaded.processor, rope=rope)], loaded.processor.pad_id)
        labels = batch.pop("labels")
        with autocast():
            logps.append(-shifted_cross_entropy(model(**batch).logits, labels))
            with torch.no_grad(), model.disable_adapter():
                refs.append(-shifted_cross_entropy(model(**batch).logits, labels))
        counts.append((labels[:, 1:] != -100).sum())
    scores = pair_scores(torch.stack(logps), torch.stack(refs), torch.stack(counts), BETA, loss_type)
    total = scores.losses.sum()
    total.backward()
    return total.detach(), scores, grads(model)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_grad_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_dpo_loss_and_gradients_equal_one_by_one(policy, media_dir, loss_type):
    fam, loaded, model = policy
    flat = [x for p in pairs(media_dir) for x in (p.chosen_sample(), p.rejected_sample())]
    total, scores, g = packed_result(model, packed(fam, loaded, flat), loss_type)
    total1, scores1, g1 = alone_result(model, fam, loaded, flat, loss_type)
    assert abs(total - total1) <= 1e-5, (total, total1)
    for a, b in [(scores.chosen_rewards, scores1.chosen_rewards), (scores.rejected_rewards, scores1.rejected_rewards)]:
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert scores.chosen_rewards.abs().max() > 1e-3  # the policy really differs from its reference
    assert max_grad_diff(g, g1) <= 1e-5
    # the encoders' LoRA got gradients too: the media in the prompts reach the loss
    assert any("audio" in k for k in g) and any("visual" in k for k in g)


def test_the_exactness_check_catches_samples_that_see_each_other(policy, media_dir):
    fam, loaded, model = policy
    flat = [x for p in pairs(media_dir) for x in (p.chosen_sample(), p.rejected_sample())]
    total, scores, g = packed_result(model, packed(fam, loaded, flat, break_isolation=True), "sigmoid")
    total1, scores1, g1 = alone_result(model, fam, loaded, flat, "sigmoid")
    assert (scores.chosen_rewards - scores1.chosen_rewards).abs().max() > 1e-3
    assert max_grad_diff(g, g1) > 1e-5


def test_packed_dpo_under_bf16_autocast_is_close(policy, media_dir):
    fam, loaded, model = policy
    flat = [x for p in pairs(media_dir) for x in (p.chosen_sample(), p.rejected_sample())]
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    total, scores, g = packed_result(model, packed(fam, loaded, flat), "sigmoid", bf16)
    total1, scores1, g1 = alone_result(model, fam, loaded, flat, "sigmoid", bf16)
    print(f"bf16: loss {total.item():.6f} vs {total1.item():.6f}, max grad diff {max_grad_diff(g, g1):.3g}")
    assert abs(total - total1) <= 2e-2 * abs(total1), (total, total1)
    scale = max(v.abs().max().item() for v in g1.values())
    assert max_grad_diff(g, g1) <= 5e-2 * scale


def test_pairs_are_binned_whole_chosen_first():
    from finetune.packing import plan_pair_bins

    lengths = [30, 50, 10, 10, 60, 5, 20, 20]  # pairs: 80, 20, 65, 40
    bins = plan_pair_bins(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(8))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 100
        assert all(b[k] % 2 == 0 and b[k + 1] == b[k] + 1 for k in range(0, len(b), 2))


def test_segment_sums_sum_each_samples_label_tokens():
    from finetune.dpo import segment_sums

    got = segment_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 2, 1]), 4)
    assert got.tolist() == [3.0, 4.0, 3.0, 0.0]


def test_preference_figures_from_sequence_log_probabilities():
    """score_preferences: the implicit rewards of tuned against the reference, their accuracy and
    margin, and per model how often it prefers the chosen answer, with tuned's paired tests."""
    from finetune.evaluate import score_preferences

    # three pairs [chosen, rejected]: log-ratios (tuned - start) of (+2, -1), (0, +1), (+1, 0)
    start = torch.tensor([-10.0, -8.0, -5.0, -6.0, -7.0, -7.0])
    tuned = start + torch.tensor([2.0, -1.0, 0.0, 1.0, 1.0, 0.0])
    base = torch.tensor([-1.0, -9.0, -1.0, -9.0, -1.0, -9.0])
    got = score_preferences({"tuned": tuned, "start": start, "base": base}, 0.5, reference="start", n_resamples=200)
    assert got["n_pairs"] == 3
    assert got["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert got["margin"]["mean"] == pytest.approx(0.5 * (3 - 1 + 1) / 3)
    assert got["chosen_reward"]["mean"] == pytest.approx(0.5 * 3 / 3)
    assert got["rejected_reward"]["mean"] == pytest.approx(0.5 * 0 / 3)
    assert {k: v["mean"] for k, v in got["prefers_chosen"].items()} == pytest.approx(
        {"tuned": 2 / 3, "start": 1 / 3, "base": 1.0})  # tuned: -8 > -9, -5 = -5, -6 > -7
    assert got["paired"]["tuned_vs_base"]["change"] == pytest.approx(-1 / 3)
    assert got["paired"]["tuned_vs_start"]["change"] == pytest.approx(1 / 3)
    assert set(got["paired"]) == {"tuned_vs_start", "tuned_vs_base"}
    assert got["accuracy"]["ci"][0] <= got["accuracy"]["mean"] <= got["accuracy"]["ci"][1]


def test_the_demo_writes_each_split_as_preference_pairs(tmp_path):
    """The demo folder holds train_pairs.jsonl and eval_pairs.jsonl beside the conversations: one
    pair per sample, the chosen answer its reply, the rejected one a reply of the same task with
    another answer; they read as DPO data (check_method) with the media the samples have."""
    import json

    from finetune.data.reading import check_method
    from finetune.demo_data import generate_medical

    paths = generate_medical(tmp_path / "demo", n_train=16, n_eval=8, seed=0)
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        pairs_file = tmp_path / "demo" / f"{split}_pairs.jsonl"
        got = [parse_sample(json.loads(line), source=str(pairs_file), line=i + 1, base_dir=pairs_file.parent)
               for i, line in enumerate(pairs_file.read_text().splitlines())]
        assert len(got) == len(rows)
        check_method(got, "dpo", split)
        for row, p in zip(rows, got):
            assert p.chosen_sample().messages[-1].text() == row["messages"][-1]["content"]
            assert p.rejected.text() != row["messages"][-1]["content"]
            assert p.task == row["task"] and len(p.media()) == sum(
                isinstance(m["content"], list) and sum("path" in x for x in m["content"]) for m in row["messages"])
    lesion = [json.loads(line) for line in (tmp_path / "demo" / "train_pairs.jsonl").read_text().splitlines()
              if json.loads(line)["task"] == "lesion"]
    assert lesion and all(r["messages"][-1]["chosen"][:3] != r["messages"][-1]["rejected"][:3] for r in lesion)


DPO_RUN = ["train.method=dpo", "roles.vision_encoder.mode=frozen", "roles.vision_projector.mode=frozen",
           "roles.lm_head.mode=frozen", "data.allow_outside_paths=true", "data.eval=", "data.max_tokens=512",
           "train.lr=3e-3", "train.warmup_ratio=0", "train.scheduler=constant", "train.dpo_beta=0.5"]


@pytest.mark.slow
def test_a_tiny_dpo_run_raises_preference_accuracy(tmp_path, small_demo):
    """A short DPO run on pairs built from the demo's training split: the logged rewards, margins and
    preference accuracy are in metrics.jsonl, and the accuracy and margin of the last steps are above
    the first ones'."""
    import json

    from conftest import demo_pairs, tiny_recipe

    from finetune.train import train

    data = demo_pairs(small_demo, tmp_path)
    recipe = tiny_recipe(tmp_path, small_demo, *DPO_RUN, f"data.train={data}", "train.max_steps=30",
                         "train.save_steps=100", "train.grad_accum=1")
    run = train(recipe)
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "rewards/accuracies" in r]
    assert len(steps) == 30
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "loss"):
        assert all(key in r for r in steps)
    first, last = steps[:8], steps[-8:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    print({k: (round(mean(first, k), 3), round(mean(last, k), 3)) for k in ("rewards/accuracies", "rewards/margins",
                                                                            "loss")})
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies") + 0.2
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins")
    assert mean(last, "loss") < mean(first, "loss")


STAGED = """extends: medical-tiny
stages:
  - name: sft
    roles: {{llm: {{mode: lora, r: 8, alpha: 16, dropout: 0.0}}}}
    train: {{max_steps: 4}}
  - name: dpo
    roles: {{llm: {{mode: lora, r: 8, alpha: 16, dropout: 0.0}}}}
    data: {{train: {pairs}, eval: {pairs_eval}, allow_outside_paths: true, max_tokens: 512}}
    train: {{method: dpo, max_steps: 3, dpo_beta: 0.5, warmup_ratio: 0}}
"""


@pytest.mark.slow
def test_dpo_as_a_stage_after_sft_has_the_sft_model_as_its_reference(tmp_path, small_demo):
    """SFT, then DPO on pairs: the DPO stage loads the SFT stage's merged export, and its first step
    scores exactly log 2 with zero rewards: the policy (fresh LoRA, B = 0) equals its reference, the
    model with the adapters disabled, which is that merged export (not the original base)."""
    import json
    import math
    from pathlib import Path

    from conftest import demo_pairs, tiny_overrides

    from finetune.cli import run_stages
    from finetune.recipe import load_recipe

    recipe = tmp_path / "staged.yaml"
    recipe.write_text(STAGED.format(pairs=demo_pairs(small_demo, tmp_path),
                                    pairs_eval=demo_pairs(small_demo, tmp_path, "eval")))
    run = run_stages(load_recipe(recipe, tiny_overrides(tmp_path, small_demo)))
    sft = run / "stages" / "01-sft"
    assert (sft / "merged" / "export_manifest.json").exists()
    base = json.loads((run / "adapter" / "base_model.json").read_text())["base_path"]
    assert Path(base).resolve() == (sft / "merged").resolve()
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logs if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert any(r.get("rewards/margins", 0) != 0 for r in logs if r.get("step", 0) > 1)  # and then it trains
    # eval on held-out pairs: rewards against the SFT model (the adapters disabled), and how often
    # the original model, the SFT model (start) and the final one prefer the chosen answer
    from finetune.evaluate import evaluate

    got = evaluate(load_recipe(recipe, tiny_overrides(tmp_path, small_demo)), run)
    pref = json.loads((run / "eval.json").read_text())["preference"]
    assert got["preference"] == pref and pref["n_pairs"] == 6 and pref["reference"] == "start"  # eval.max_samples
    assert set(pref["prefers_chosen"]) == {"base", "start", "tuned"}
    assert 0 <= pref["accuracy"]["mean"] <= 1 and pref["margin"]["n"] == 6
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:  # base is the original model, start the SFT model, tuned the SFT model with DPO's LoRA
        assert r["base_logp_chosen"] != pytest.approx(r["start_logp_chosen"], abs=1e-4)
        assert r["tuned_logp_chosen"] != pytest.approx(r["start_logp_chosen"], abs=1e-6)


def test_the_recipe_refuses_dpo_without_a_lora_reference_or_without_packing():
    from finetune.recipe import load_recipe
    from finetune.recipe.fields import RecipeError

    with pytest.raises(RecipeError) as raised:  # medical-tiny trains its vision encoder, projector and lm_head in full
        load_recipe("medical-tiny", ["data.demo=", "train.method=dpo"])
    msg = str(raised.value)
    assert "adapters disabled" in msg and "lm_head" in msg and "roles.vision_encoder.mode" in msg, msg
    with pytest.raises(RecipeError, match="set e.g. roles.llm.mode: lora"):
        load_recipe("medical-tiny", ["data.demo=", "train.method=dpo", "roles.llm.mode=frozen",
                                     "roles.vision_encoder.mode=frozen", "roles.vision_projector.mode=frozen",
                                     "roles.lm_head.mode=frozen"])
    lora_only = ["data.demo=", "train.method=dpo", "roles.vision_encoder.mode=frozen",
                 "roles.vision_projector.mode=frozen", "roles.lm_head.mode=frozen"]
    with pytest.raises(RecipeError, match="set data.packing: true"):
        load_recipe("medical-tiny", [*lora_only, "data.packing=false"])
    with pytest.raises(RecipeError, match="dpo_loss"):
        load_recipe("medical-tiny", [*lora_only, "train.dpo_loss=hinge"])
    with pytest.raises(RecipeError, match="dpo_beta"):
        load_recipe("medical-tiny", [*lora_only, "train.dpo_beta=0"])
    r = load_recipe("medical-tiny", lora_only)
    assert (r.train.method, r.train.dpo_beta, r.train.dpo_loss) == ("dpo", 0.1, "sigmoid")
    assert load_recipe("medical-tiny", ["data.demo="]).train.method == "sft"


def test_dpo_on_chat_data_and_sft_on_pairs_stop_once_naming_the_line(media_dir):
    from finetune.data.reading import check_method
    from finetune.errors import ConfigError

    chat = parse_sample({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                        source="chat.jsonl", line=3, base_dir=media_dir)
    prefs = pairs(media_dir)
    with pytest.raises(ConfigError) as raised:
        check_method(prefs + [chat], "dpo", "data.train")
    assert "chat.jsonl:3 is a plain conversation" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        check_method([chat] * 300 + prefs, "sft", "data.train")
    msg = str(raised.value)
    assert msg.count("preference data") == 1 and "p.jsonl:1" in msg and "set train.method: dpo" in msg
    check_method(prefs, "dpo", "data.train")
    check_method([chat], "sft", "data.train")
