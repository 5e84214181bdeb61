"""GRPO on packed completions: group-normalised advantages, the loss and its gradients on packed
rows equal those of each completion run alone (fp32, 1e-5), with a control whose broken isolation
fails; rewards from the evaluation's metrics; the recipe's rules for the method; a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finetune.data.schema import parse_sample

BETA, EPS = 0.3, 0.2


def prompt(media_dir, parts, answer, **extra):
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]
    return parse_sample({"messages": msgs, **extra}, source="g.jsonl", line=1, base_dir=media_dir)


def prompts(media_dir):
    # media anywhere in the prompt; a multi-turn prompt whose earlier answer is context
    multi = parse_sample({"messages": [
        {"role": "user", "content": "What does MRI stand for?"},
        {"role": "assistant", "content": "Magnetic resonance imaging."},
        {"role": "user", "content": "Is it an X-ray?"}, {"role": "assistant", "content": "No."}]},
        source="g.jsonl", line=3, base_dir=media_dir)
    return [prompt(media_dir, [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "a.wav"},
                               {"type": "text", "text": "Is there a lesion?"}], "Yes."),
            prompt(media_dir, [{"type": "text", "text": "Listen."}, {"type": "audio", "path": "a.wav"}], "A cough."),
            multi]


#: two sampled answers per prompt (G = 2), of different lengths, and their rewards
ANSWERS = ["Yes.", "No, there is no lesion in this image at all.", "A cough.", "Music.", "No.", "Yes, it is."]
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.25, 1.0, 0.0])


def completions(media_dir):
    from finetune.rollout import completion_sample

    return [completion_sample(p, ANSWERS[2 * k + j]) for k, p in enumerate(prompts(media_dir)) for j in range(2)]


def packed(fam, loaded, samples, max_tokens, break_isolation=False):
    from finetune.packing import pack_completions

    rope = fam.rope_index(loaded.model)
    enc = [fam.encode(s, loaded.processor, rope=rope) for s in samples]
    batch = pack_completions(fam, enc, loaded.processor.pad_id, max_tokens)
    if break_isolation:  # the control: positions that do not restart, so samples see each other
        pos = batch["position_ids"]
        pos[0] = torch.arange(pos.shape[-1])
    return batch


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_grad_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def packed_result(model, batch, beta=BETA):
    from finetune.trainer import completion_loss

    model.zero_grad()
    total, scores = completion_loss(model, batch, REWARDS, 2, beta=beta, epsilon=EPS)
    total.backward()
    return total.detach(), scores, grads(model)


def alone_result(model, fam, loaded, samples, beta=BETA):
    """Each completion in a batch of its own through the model's padded path and plain logits,
    with the GRPO objective written out per token (no packing, no label head, no segment sums)."""
    model.zero_grad()
    rope = fam.rope_index(loaded.model)
    r = REWARDS.view(-1, 2)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    total, kls = 0.0, []
    for i, s in enumerate(samples):
        batch = fam.collate_padded([fam.encode(s, loaded.processor, rope=rope)], loaded.processor.pad_id)
        labels = batch.pop("labels")[0, 1:]
        keep = labels != -100

        def token_logps(logits):
            return torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0][keep]

        lp = token_logps(model(**batch).logits)
        with torch.no_grad(), model.disable_adapter():
            ref = token_logps(model(**batch).logits)
        ratio = torch.exp(lp - lp.detach())
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        total = total + (-(ratio * adv[i]) + beta * kl).mean()
        kls.append(kl.detach().mean())
    total.backward()
    return total.detach(), torch.stack(kls), grads(model)


def test_advantages_are_normalised_within_each_group():
    from finetune.grpo import group_advantages

    got = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0]), 4)
    a = torch.tensor([1.0, 0.0, 0.5, 0.5])
    b = torch.tensor([2.0, 0.0, 1.0, 1.0])
    want = torch.cat([(a - a.mean()) / (a.std() + 1e-4), (b - b.mean()) / (b.std() + 1e-4)])
    assert torch.allclose(got, want, atol=1e-6)
    assert got[:4].sum().abs() < 1e-6  # zero mean within the group
    assert torch.equal(group_advantages(torch.ones(3), 3), torch.zeros(3))  # equal rewards: nothing to learn
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.ones(5), 2)


@pytest.mark.parametrize("max_tokens", [4096, 160], ids=["one-row", "several-rows"])
def test_packed_grpo_loss_and_gradients_equal_one_by_one(policy, media_dir, max_tokens):
    fam, loaded, model = policy
    samples = completions(media_dir)
    batch = packed(fam, loaded, samples, max_tokens)
    rows = batch["input_ids"].shape[0]
    assert (rows == 1) == (max_tokens == 4096)  # they really share rows, or really span several
    order = batch["completion_segments"]
    assert order.unique().tolist() == list(range(6))
    assert order.tolist() != sorted(order.tolist())  # packed out of the completions' order (longest first)
    total, scores, g = packed_result(model, batch)
    total1, kl1, g1 = alone_result(model, fam, loaded, samples)
    assert abs(total - total1) <= 1e-5, (total, total1)
    assert torch.allclose(scores.kl, kl1, atol=1e-5), (scores.kl, kl1)
    assert kl1.max() > 1e-4  # the policy really differs from its reference
    assert max_grad_diff(g, g1) <= 1e-5
    assert scores.clipped.sum() == 0  # one step per rollout: the ratio is 1
    # the encoders' LoRA got gradients too: the media in the prompts reach the loss
    assert any("audio" in k for k in g) and any("visual" in k for k in g)


def test_the_exactness_check_catches_completions_that_see_each_other(policy, media_dir):
    fam, loaded, model = policy
    samples = completions(media_dir)
    total, scores, g = packed_result(model, packed(fam, loaded, samples, 4096, break_isolation=True))
    total1, kl1, g1 = alone_result(model, fam, loaded, samples)
    assert (scores.kl - kl1).abs().max() > 1e-4
    assert max_grad_diff(g, g1) > 1e-5


def test_the_completion_keeps_earlier_answers_as_context_and_learns_the_sampled_one(media_dir):
    from finetune.rollout import completion_sample

    multi = prompts(media_dir)[2]
    c = completion_sample(multi, "Maybe.")
    assert [m.role for m in c.messages] == ["user", "assistant", "user", "assistant"]
    assert c.messages[1].loss is False and c.messages[-1].loss is True
    assert c.messages[-1].text() == "Maybe." and multi.messages[-1].text() == "No."  # the sample is untouched
    assert multi.messages[1].loss is True


def test_rewards_are_the_evaluations_scores_plus_the_format_reward():
    from finetune.metrics import plan_metrics
    from finetune.rollout import readable, reward

    yesno, choice, exact = plan_metrics([
        parse_sample({"messages": [{"role": "user", "content": "Lesion?"}, {"role": "assistant", "content": "No."}]},
                     source="g.jsonl", line=1, base_dir=Path(".")),
        parse_sample({"messages": [{"role": "user", "content": "Which? A) CT B) MRI"},
                                   {"role": "assistant", "content": "B"}], "options": {"A": "CT", "B": "MRI"}},
                     source="g.jsonl", line=2, base_dir=Path(".")),
        parse_sample({"messages": [{"role": "user", "content": "Organ?"}, {"role": "assistant", "content": "Liver."}]},
                     source="g.jsonl", line=3, base_dir=Path("."))])
    assert reward(yesno, "No, it is clear.") == 1.0 and reward(yesno, "Yes.") == 0.0
    assert reward(yesno, "There is none.", 0.2) == 0.0 and reward(yesno, "Yes.", 0.2) == pytest.approx(0.2)
    assert reward(choice, "The answer is MRI.") == 1.0 and reward(choice, "A", 0.5) == 0.5
    assert not readable(choice, "I do not know") and readable(exact, "Spleen")
    assert reward(exact, "The liver.") == 1.0 and reward(exact, "", 0.3) == 0.0


def test_the_recipe_refuses_grpo_without_a_lora_reference_or_without_packing():
    from finetune.recipe import load_recipe
    from finetune.recipe.fields import RecipeError

    with pytest.raises(RecipeError, match="data.packing: true"):
        load_recipe("medical-tiny", ["train.method=grpo", "data.packing=false"])
    with pytest.raises(RecipeError, match="roles.vision_projector.mode: lora"):
        load_recipe("medical-tiny", ["train.method=grpo", "roles.vision_projector.mode=full"])
    with pytest.raises(RecipeError, match="grpo_group"):
        load_recipe("medical-tiny", ["train.method=grpo", "train.grpo_group=1"])


STAGED = """extends: medical-tiny
stages:
  - name: sft
    train: {max_steps: 4}
  - name: grpo
    roles:
      llm: {mode: lora, r: 8, alpha: 16, dropout: 0.0}
      vision_encoder: {mode: frozen}
      vision_projector: {mode: frozen}
      lm_head: {mode: frozen}
    train: {method: grpo, max_steps: 3, batch_size: 2, grpo_group: 4, grpo_max_new_tokens: 6, lr: 1.0e-3,
            warmup_ratio: 0, scheduler: constant}
"""


@pytest.mark.slow
def test_grpo_as_a_stage_after_sft_logs_its_rewards_and_eval_scores_its_start(tmp_path, small_demo):
    """SFT, then three GRPO steps on the demo's closed questions: each logged step has the reward,
    its spread, the KL (0 at step 1: a fresh LoRA on the SFT model is its reference), the clip ratio
    and the answer length; eval scores base (the original model), start (the SFT model) and tuned,
    with GRPO's own gain tested against start. A budget that cannot hold a prompt with its longest
    answer stops before step 1, naming both settings."""
    import json

    from conftest import tiny_overrides, tiny_recipe

    from finetune.cli import run_stages
    from finetune.errors import ConfigError
    from finetune.evaluate import evaluate
    from finetune.recipe import load_recipe
    from finetune.train import train

    recipe = tmp_path / "staged.yaml"
    recipe.write_text(STAGED)
    run = run_stages(load_recipe(recipe, tiny_overrides(tmp_path, small_demo)))
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0 <= r["reward"] <= 1 and r["reward_group_std"] >= 0 and r["kl"] >= 0
        assert r["clip_ratio"] == 0 and r["completion_length"] >= 1  # the answer and its end of turn, re-tokenised
        assert math.isfinite(r["loss"])
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6)
    got = evaluate(load_recipe(recipe, tiny_overrides(tmp_path, small_demo)), run)
    assert {"base", "start", "tuned", "paired", "paired_start"} <= set(got)
    assert got["paired_start"]["overall"]["n"] == got["n_samples"] == 6
    assert "The last stage's own gain" in (run / "eval.md").read_text()
    with pytest.raises(ConfigError, match="grpo_max_new_tokens"):
        train(tiny_recipe(tmp_path / "small", small_demo, "train.method=grpo", "roles.vision_encoder.mode=frozen",
                          "roles.vision_projector.mode=frozen", "roles.lm_head.mode=frozen",
                          "train.grpo_max_new_tokens=4000", "data.max_tokens=4096"))


def test_the_seeded_sampler_draws_from_the_softmax_at_its_temperature():
    """Inverse-CDF sampling: over 20,000 draws each token's frequency is its softmax(logits / T)
    probability within 4.5 standard errors, and the same seeds draw the same tokens."""
    from finetune.probes import SeededSampler

    logits, temperature, rows, calls = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0]), 0.7, 2000, 10
    sampler = SeededSampler(temperature, list(range(rows)))
    draws = torch.cat([sampler(None, logits.expand(rows, -1)).argmax(-1) for _ in range(calls)])
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    p = torch.softmax(logits.double() / temperature, -1)
    se = (p * (1 - p) / draws.numel()).sqrt()
    assert ((freq - p).abs() <= 4.5 * se + 1e-12).all(), (freq, p)
    again = SeededSampler(temperature, list(range(rows)))
    assert torch.equal(torch.cat([again(None, logits.expand(rows, -1)).argmax(-1) for _ in range(calls)]), draws)


def test_a_seeded_rollout_depends_on_its_seed_not_on_the_rows_beside_it(policy, media_dir):
    """A completion sampled with its own seed is the same in one batch with the other prompts' as
    alone with its group (what makes GRPO's rollouts equal under 1 or 2 processes and after a
    resume); another step's seeds sample other answers."""
    from finetune.probes import generate
    from finetune.rollout import completion_seeds

    fam, loaded, model = policy
    ps, rope = prompts(media_dir), fam.rope_index(loaded.model)
    seeds = completion_seeds(ps, 2, seed=7, step=3)
    assert len(set(seeds)) == 6 and completion_seeds(ps[1:], 2, seed=7, step=3) == seeds[2:]

    def sample(chunk, chunk_seeds):
        return generate(model, fam, loaded.processor, [p for p in chunk for _ in range(2)], rope, max_new_tokens=6,
                        batch_size=2 * len(chunk), temperature=1.0, seeds=chunk_seeds)

    together = sample(ps, seeds)
    alone = [a for k, p in enumerate(ps) for a in sample([p], seeds[2 * k: 2 * k + 2])]
    print(together)
    assert together == alone
    assert together[0] != together[1] or together[2] != together[3]  # sampled, not greedy
    assert sample(ps, seeds) == together
    assert sample(ps, completion_seeds(ps, 2, seed=7, step=4)) != together
