"""The Nemotron-3-Nano-Omni family beyond the contract suite: the Mamba-2 mixers' exact packing
(convolution and scan restarted at every sample boundary, with a control that removes the reset),
the CUDA kernels' branch (stubbed: `causal_conv1d` / `mamba_ssm` are not installable here),
the prompt and preprocessing transformers' own processor gives, the audio tower clip by clip, the
mixture of experts (LoRA on the fused experts, a trained router, the load-balancing loss), the
label-token loss head, `plan` on the real config, and the export in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from media_samples import sample

from finetune.families import get_family
from finetune.models import load_spec

FAMILY = "nemotron_omni"


def recipe(*overrides):
    from finetune.recipe import load_recipe

    return load_recipe("medical-nemotron-omni-tiny", list(overrides))


@pytest.fixture(scope="module")
def loaded():
    return get_family(FAMILY).load(load_spec(recipe(), dtype=torch.float32, attn="sdpa"))


# ---- mixture of experts ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("head", ["plain", "label_positions"])
def test_expert_lora_router_and_aux_loss_train(tmp_path, monkeypatch, head):
    """roles.llm.experts: lora puts LoRA on every expert of the fused up/down weights and
    roles.llm.router: full trains the sigmoid routers; the load-balancing loss is logged every step
    and joins the loss with train.router_aux_loss_coef, on both loss paths: the plain one (logits)
    and the label-token head (`label_positions`, the GPU path: forced here by lowering the plain
    path's size limit). (Merging expert LoRA is the export's generic path, tested on Qwen3-Omni; the
    contract suite exports this family.)"""
    from safetensors.torch import load_file

    from finetune import trainer as T
    from finetune.train import train

    if head == "label_positions":
        monkeypatch.setattr(T, "PLAIN_LOSS_MAX_LOGITS", 0)

    def run(name, coef):
        r = recipe(f"output.dir={tmp_path / name}", "roles.llm.experts=lora", "roles.llm.router=full",
                   "roles.llm.r=4", "train.max_steps=2", "train.save_steps=2", "data.max_tokens=256",
                   f"train.router_aux_loss_coef={coef}", "train.seed=3")
        train(r)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [x for x in rows if "loss" in x and "aux_loss" in x]

    without, with_aux = run("coef0", 0.0), run("coef1", 1.0)
    assert len(without) == 2 and len(with_aux) == 2
    first0, first1 = without[0], with_aux[0]
    assert first0["aux_loss"] > 0
    assert first1["aux_loss"] == pytest.approx(first0["aux_loss"], rel=1e-5)  # the same weights at step 1
    assert first1["loss"] - first0["loss"] == pytest.approx(first0["aux_loss"], rel=1e-3)

    adapter = load_file(str(tmp_path / "coef1" / "adapter" / "adapter_model.safetensors"))
    experts = [k for k in adapter if "mixer.experts" in k and "lora_" in k]
    routers = [k for k in adapter if k.endswith("mixer.gate.weight")]
    assert len(experts) == 2 * 2 * 2  # 2 MoE layers x (up, down) x (A, B)
    assert len(routers) == 2
    mamba = [k for k in adapter if ".mixer.in_proj." in k or ".mixer.out_proj." in k]
    assert len(mamba) == 2 * 2 * 2  # 2 Mamba-2 layers x (in_proj, out_proj) x (A, B): LoRA reaches them


# ---- Mamba-2: exact packing ------------------------------------------------------------------
CHUNK = 16  # the tiny model's Mamba chunk (nemotron_omni_tiny.tiny_config)


def test_packed_scan_and_conv_equal_each_sample_alone():
    """The exact CPU path on its own: our masked chunked scan and causal convolution over a row of
    samples equal transformers' reference scan and convolution on each sample alone (values and
    gradients, fp32), for boundaries inside a chunk, on chunk edges, a one-token sample, and a sample
    spanning several chunks; the same row scanned without boundaries does not."""
    from transformers.models.nemotron_h import modeling_nemotron_h as M

    from finetune.families.nemotron_mamba import causal_conv1d_packed, chunk_scan_packed

    g = torch.Generator().manual_seed(0)
    H, P, G, N, C = 4, 8, 2, 6, 12
    for lens in ([5, 11, 16], [16, 16, 3], [1, 2, 33], [8, 8, 8, 9], [40]):
        L = sum(lens)
        x, dt = torch.randn(2, L, H, P, generator=g), torch.randn(2, L, H, generator=g)
        B, Cm = torch.randn(2, L, G, N, generator=g), torch.randn(2, L, G, N, generator=g)
        A, D, dt_bias = -torch.rand(H, generator=g) * 2, torch.randn(H, generator=g), torch.randn(H, generator=g)
        xc, w, bias = torch.randn(2, L, C, generator=g), torch.randn(C, 4, generator=g), torch.randn(C, generator=g)
        for t in (x, dt, B, Cm, xc, w):
            t.requires_grad_(True)
        seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).expand(2, -1).to(torch.int32)
        kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(1e-3, float("inf")))
        packed = chunk_scan_packed(x, dt, A, B, Cm, CHUNK, seq, **kw)
        conv = causal_conv1d_packed(xc, w, bias, seq, "silu")
        alone, conv_alone, o = [], [], 0
        for n in lens:
            s = slice(o, o + n)
            alone.append(M.mamba2_chunk_scan(x[:, s], dt[:, s], A, B[:, s], Cm[:, s], chunk_size=CHUNK, **kw))
            conv_alone.append(M.causal_conv1d_fn(xc[:, s].transpose(1, 2), w, bias, activation="silu").transpose(1, 2))
            o += n
        alone, conv_alone = torch.cat(alone, 1), torch.cat(conv_alone, 1)
        assert float((packed - alone).abs().max()) <= 1e-5, lens
        assert float((conv - conv_alone).abs().max()) <= 1e-5, lens
        weights = torch.randn(packed.shape, generator=g), torch.randn(conv.shape, generator=g)
        grads = torch.autograd.grad((packed * weights[0]).sum() + (conv * weights[1]).sum(), (x, dt, B, Cm, xc, w))
        ref = torch.autograd.grad((alone * weights[0]).sum() + (conv_alone * weights[1]).sum(), (x, dt, B, Cm, xc, w))
        assert max(float((a - b).abs().max()) for a, b in zip(grads, ref)) <= 1e-4, lens
        if len(lens) > 1:  # the control: the same row as one sequence carries state across samples
            whole = chunk_scan_packed(x, dt, A, B, Cm, CHUNK, torch.zeros_like(seq), **kw)
            assert float((whole - alone).abs().max()) > 1e-2, lens


def _to_boundaries(encs) -> list[int]:
    out, o = [], 0
    for e in encs[:-1]:
        o += e.num_tokens
        out.append(o)
    return out


def _mixed_samples(media_dir, fam, proc):
    """Text, image, audio and image+audio samples whose packed row puts a boundary on a Mamba chunk
    edge and others inside chunks (answers lengthened a word at a time to land on an edge)."""
    sf.write(media_dir / "odd.wav", (np.random.default_rng(3).standard_normal(16_700) * 0.1).astype(np.float32), 16000)
    parts = [[{"type": "image", "path": "a.png"}, {"type": "text", "text": "Is there a lesion?"}],
             [{"type": "text", "text": "What does MRI stand for?"}],
             [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}],
             [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "odd.wav"},
              {"type": "text", "text": "Both."}]]
    samples, offset = [], 0
    for i, p in enumerate(parts):
        answer = f"Yes. Case {i}."
        s = sample(media_dir, p, answer=answer)
        if i == 1:  # the second sample ends on a chunk edge
            while (offset + fam.encode(s, proc).num_tokens) % CHUNK:
                answer += " a"
                s = sample(media_dir, p, answer=answer)
        samples.append(s)
        offset += fam.encode(s, proc).num_tokens
    bounds = _to_boundaries([fam.encode(s, proc) for s in samples])
    assert any(b % CHUNK == 0 for b in bounds) and any(b % CHUNK for b in bounds), bounds
    return samples


@pytest.fixture()
def trained_model():
    """The tiny model with every role training (LoRA on the LLM, Mamba-2 in/out projections
    included, and on the towers; projectors and lm_head in full), LoRA B perturbed."""
    from finetune import adapters
    from finetune.verify import perturb_lora_b

    fam = get_family(FAMILY)
    ld = fam.load(load_spec(recipe(), dtype=torch.float32, attn="sdpa"))
    r = recipe("roles.llm.mode=lora", "roles.vision_encoder.mode=lora", "roles.audio_encoder.mode=lora",
               "roles.vision_projector.mode=full", "roles.audio_projector.mode=full", "roles.lm_head.mode=full")
    model, _ = adapters.apply_roles(ld.model, fam, r)
    assert any(".mixer.in_proj.lora_A" in n for n, _ in model.named_parameters())
    assert any(".mixer.out_proj.lora_A" in n for n, _ in model.named_parameters())
    perturb_lora_b(model, 0.05)
    return fam, ld, model


@pytest.mark.parametrize("pipeline", ["sdpa", "training"])
def test_mamba_packing_is_exact_on_mixed_rows(media_dir, trained_model, pipeline):
    """Images, audio and text in one packed row, boundaries inside Mamba chunks and on a chunk edge:
    per-token logits, the loss and every trainable parameter's gradient equal each sample alone
    (fp32, 1e-5), through the SDPA mask and through training's pipeline (varlen LLM attention with
    the collator's boundaries, towers' inputs from the collator)."""
    from finetune.verify import compare_packed

    fam, ld, model = trained_model
    samples = _mixed_samples(media_dir, fam, ld.processor)
    kw = {} if pipeline == "sdpa" else {"packed_attn": "varlen", "varlen_args": True, "towers": True}
    res = compare_packed(model, fam, ld.processor, samples, None, max_tokens=8192, **kw)
    assert res.n_rows == 1, res.format()
    assert res.max_logit_diff <= 1e-5 and res.loss_diff <= 1e-5 and res.max_grad_diff <= 1e-5, res.format()
    assert res.grad_scale > 0


@pytest.mark.parametrize("removed", ["scan", "convolution"])
def test_mamba_packing_control_without_the_reset(media_dir, trained_model, monkeypatch, removed):
    """The control: the same row with the scan's (or the convolution's) reset removed, every token
    treated as one sample's, fails the comparison above: the reset is what makes it exact."""
    from finetune.families import nemotron_mamba as NM
    from finetune.verify import compare_packed

    name = "chunk_scan_packed" if removed == "scan" else "causal_conv1d_packed"
    real = getattr(NM, name)
    at = 6 if removed == "scan" else 3  # the seq_idx argument

    def without_reset(*args, **kwargs):
        args = list(args)
        args[at] = torch.zeros_like(args[at])
        return real(*args, **kwargs)

    monkeypatch.setattr(NM, name, without_reset)
    fam, ld, model = trained_model
    samples = _mixed_samples(media_dir, fam, ld.processor)
    res = compare_packed(model, fam, ld.processor, samples, None, max_tokens=8192)
    assert res.n_rows == 1
    assert not res.passed and res.max_logit_diff > 1e-3, res.format()


# ---- the CUDA kernels' branch (stubbed) -------------------------------------------------------
KERNEL_STUBS = {
    "causal_conv1d/__init__.py": '''
import json, os
import torch


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Stands in for the CUDA kernel: records its call, then computes what it computes (channels-last
    x [B, C, L]; a tap never crosses a change of seq_idx) with the toolkit's exact reference."""
    from finetune.families.nemotron_mamba import causal_conv1d_packed

    with open(os.environ["KERNEL_CALLS"], "a") as f:
        f.write(json.dumps({"fn": "conv", "seq_idx": None if seq_idx is None else seq_idx.tolist(),
                            "dtype": None if seq_idx is None else str(seq_idx.dtype),
                            "channels_last": x.stride(1) == 1}) + "\\n")
    seq = torch.zeros(x.shape[0], x.shape[2], dtype=torch.int32) if seq_idx is None else seq_idx
    return causal_conv1d_packed(x.transpose(1, 2), weight, bias, seq, activation).transpose(1, 2)
''',
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/selective_state_update.py": '''
def selective_state_update(*args, **kwargs):
    raise AssertionError("decoding is not part of this test")
''',
    "mamba_ssm/ops/triton/ssd_combined.py": '''
import json, os
import torch


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """Stands in for the CUDA kernel (records its call; the state restarts where seq_idx changes)."""
    from finetune.families.nemotron_mamba import chunk_scan_packed

    with open(os.environ["KERNEL_CALLS"], "a") as f:
        f.write(json.dumps({"fn": "scan", "seq_idx": None if seq_idx is None else seq_idx.tolist(),
                            "dtype": None if seq_idx is None else str(seq_idx.dtype)}) + "\\n")
    seq = torch.zeros(x.shape[:2], dtype=torch.int32) if seq_idx is None else seq_idx
    return chunk_scan_packed(x, dt, A, B, C, chunk_size, seq, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                             dt_limit=dt_limit)


def mamba_split_conv1d_scan_combined(*args, **kwargs):
    raise AssertionError("the fused kernel reads out_proj.weight directly (skipping a LoRA on it): never used")
''',
}

KERNEL_RUN = r'''
import json, sys, torch
from finetune.families import get_family, nemotron_mamba
from finetune.models import load_spec
from finetune.recipe import load_recipe
from finetune.verify import compare_packed, perturb_lora_b
from finetune import adapters
from finetune.data.schema import parse_sample

nemotron_mamba.KERNEL_DEVICES = ("cuda", "cpu")  # the stubs run on the CPU
assert nemotron_mamba.kernel_for(torch.device("cpu"), "mamba_ssm")
assert nemotron_mamba.kernel_for(torch.device("cpu"), "causal_conv1d")
fam = get_family("nemotron_omni")
r = load_recipe("medical-nemotron-omni-tiny", ["roles.llm.mode=lora"])
ld = fam.load(load_spec(r, dtype=torch.float32, attn="sdpa"))
model, _ = adapters.apply_roles(ld.model, fam, r)
perturb_lora_b(model, 0.05)
samples = [parse_sample(json.loads(line), source="t.jsonl", line=1, base_dir=sys.argv[1])
           for line in open(sys.argv[2])]
res = compare_packed(model, fam, ld.processor, samples, None, max_tokens=8192, packed_attn="varlen",
                     varlen_args=True, towers=True)
print(json.dumps({"passed": res.passed, "logits": res.max_logit_diff, "grads": res.max_grad_diff,
                  "lengths": [fam.encode(s, ld.processor).num_tokens for s in samples]}))
'''


@pytest.mark.slow
def test_cuda_kernels_get_the_packed_boundaries(media_dir, tmp_path):
    """Where `causal_conv1d` and `mamba_ssm` are installed (CUDA), packed rows go to their kernels
    with `seq_idx` (int32 [rows, L], each token's sample), not to our scan; single samples go without
    it. The packages are not installable here: stand-ins with the kernels' signatures record their
    calls (and compute with the reference), imported by transformers as it imports the real ones, in
    a fresh process. What the real kernels compute is not tested here (gpu-check runs our path)."""
    for path, text in KERNEL_STUBS.items():
        (tmp_path / "stubs" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stubs" / path).write_text(text)
    msgs = []
    for i, parts in enumerate([[{"type": "image", "path": "a.png"}, {"type": "text", "text": "Is there a lesion?"}],
                               [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}],
                               [{"type": "text", "text": "What does MRI stand for?"}]]):
        msgs.append({"messages": [{"role": "user", "content": parts},
                                  {"role": "assistant", "content": f"Yes. Case {i}."}]})
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    calls = tmp_path / "calls.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERNEL_CALLS": str(calls),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "stubs"), root])}
    res = subprocess.run([sys.executable, "-c", KERNEL_RUN, str(media_dir), str(tmp_path / "s.jsonl")], cwd=root,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["passed"], out
    seen = [json.loads(x) for x in calls.read_text().splitlines()]
    packed = [c for c in seen if c["seq_idx"] is not None]
    alone = [c for c in seen if c["seq_idx"] is None]
    mamba_layers = 2  # the tiny hybrid: layers 0 and 3
    # one by one: 3 samples x 2 Mamba layers x (conv, scan), forward; packed: one row, the same
    assert len(alone) == 3 * mamba_layers * 2 and len(packed) == mamba_layers * 2
    want = [i for i, n in enumerate(out["lengths"]) for _ in range(n)]
    for c in packed:
        assert c["dtype"] == "torch.int32" and c["seq_idx"] == [want], c["fn"]
    assert all(c["channels_last"] for c in packed if c["fn"] == "conv")  # the layout the kernel's seq_idx needs
    assert {c["fn"] for c in packed} == {"conv", "scan"}


# ---- the processor: transformers' own, the chat template -------------------------------------
def transformers_processor(tokenizer, image_processor=None):
    """transformers' NemotronH_Omni_Reasoning_V3Processor with the Parakeet feature extractor and,
    where given, its image processor (which needs torchvision); no video processor."""
    from transformers import NemotronH_Omni_Reasoning_V3Processor, ParakeetFeatureExtractor

    class Partial(NemotronH_Omni_Reasoning_V3Processor):
        def check_argument_for_proper_class(self, name, argument):
            if argument is None:  # their classes' mapping needs torchvision
                return None
            return super().check_argument_for_proper_class(name, argument)

    return Partial(image_processor=image_processor, video_processor=None, tokenizer=tokenizer,
                   feature_extractor=ParakeetFeatureExtractor(feature_size=128, sampling_rate=16000),
                   chat_template=tokenizer.chat_template)


def _chat(tmp_path, messages):
    from finetune.data.schema import parse_sample

    return parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)


def test_prompt_and_audio_features_equal_transformers_processor(loaded, tmp_path):
    """Multi-turn chats with audio clips (one of an odd length whose last conformer row lies past the
    feature mask), a system turn or none: our token ids equal what transformers' processor gives for
    the chat template's text and the same clips, and our log-mel features and masks its features."""
    fam = get_family(FAMILY)
    proc = fam.processor_class.from_folder(loaded.base_path)
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "x.wav", (rng.standard_normal(40_050) * 0.1).astype(np.float32), 16000)
    sf.write(tmp_path / "y.wav", (rng.standard_normal(16_700) * 0.1).astype(np.float32), 16000)
    chats = {
        "one clip, system": [{"role": "system", "content": "You are a radiology assistant."},
                             {"role": "user", "content": [{"type": "audio", "path": "x.wav"},
                                                          {"type": "text", "text": "Is there a lesion?"}]},
                             {"role": "assistant", "content": "Yes."}],
        "two clips, multi-turn, no system": [
            {"role": "user", "content": [{"type": "text", "text": "Listen."}, {"type": "audio", "path": "y.wav"}]},
            {"role": "assistant", "content": "A cough."},
            {"role": "user", "content": [{"type": "audio", "path": "x.wav"}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "No lesion."}],
    }
    for name, messages in chats.items():
        s = _chat(tmp_path, messages)
        enc = fam.encode(s, proc)
        ref_proc = transformers_processor(proc.tokenizer)
        text = proc.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
             for m in messages], tokenize=False)
        waves = [sf.read(tmp_path / p["path"], dtype="float32")[0] for m in messages
                 if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "audio"]
        ref = ref_proc(text=[text], audio=waves, return_tensors="pt")
        assert enc.input_ids.tolist() == ref["input_ids"][0].tolist(), name
        assert fam.count_tokens(s, proc) == enc.num_tokens
        feats, masks = enc.media["input_features"], enc.media["input_features_mask"]
        assert len(feats) == len(waves)
        for i, (f, m) in enumerate(zip(feats, masks)):
            n = f.shape[0]
            assert torch.equal(m, ref["input_features_mask"][i, :n]), name
            np.testing.assert_allclose(f.numpy(), ref["input_features"][i, :n].numpy(), atol=1e-5)  # batched STFT
            assert not ref["input_features_mask"][i, n:].any()
        assert fam.check_encoded(enc, fam.read_config(loaded.base_path), planned=enc.num_tokens) == []


def test_chat_template_renders_what_the_encoder_encodes(loaded, tmp_path):
    """Text-only chats, with and without a system turn, and the generation prompt: the encoder's ids
    are the shipped chat template's text tokenised; the learned tokens are the answers and <|im_end|>."""
    fam = get_family(FAMILY)
    proc = fam.processor_class.from_folder(loaded.base_path)
    tok = proc.tokenizer
    for messages in ([{"role": "user", "content": "What does MRI stand for?"},
                      {"role": "assistant", "content": "Magnetic resonance imaging."}],
                     [{"role": "system", "content": "You are a radiology assistant."},
                      {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "What does CT stand for?"},
                      {"role": "assistant", "content": "Computed tomography."}]):
        s = _chat(tmp_path, messages)
        enc = fam.encode(s, proc)
        assert enc.input_ids.tolist() == tok(tok.apply_chat_template(messages, tokenize=False),
                                             add_special_tokens=False)["input_ids"]
        learned = tok.decode(enc.input_ids[enc.labels != -100])
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert learned == "".join(a + "<|im_end|>" for a in answers)
        gen = fam.encode(s, proc, for_generation=True)
        want = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert gen.input_ids.tolist() == tok(want, add_special_tokens=False)["input_ids"]
        assert want.endswith("<|im_start|>assistant\n<think></think>") and (gen.labels == -100).all()


@pytest.mark.parametrize("settings", ["tiny", "released"])
def test_image_pixels_equal_transformers_image_processor(loaded, tmp_path, settings):
    """Images of several sizes: our patch grid, pixel values and token ids equal transformers' image
    processor and processor, with the tiny folder's patch budget and with the released processor's
    (1024 to 13312 patches; a large image keeps its detail). transformers' image processor needs
    torchvision (skipped without it)."""
    import importlib.metadata

    try:  # the installed distribution: another test may have put Gemma 3n's import-only stand-in in its place
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("transformers' image processor needs torchvision, which is not installed")
    from transformers import NemotronH_Omni_Reasoning_V3ImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    fam = get_family(FAMILY)
    budget = {"tiny": (16, 64, 4096), "released": (1024, 13312, 16384)}[settings]
    proc = fam.processor_class.from_folder(loaded.base_path)
    proc.min_patches, proc.max_patches, proc.max_model_len = budget
    ref_images = NemotronH_Omni_Reasoning_V3ImageProcessor(
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), patch_size=16, downsample_ratio=0.5,
        min_num_patches=budget[0], max_num_patches=budget[1], max_model_len=budget[2])
    rng = np.random.default_rng(2)
    for size in ((150, 220), (90, 60), (1100, 1500), (128, 128)):
        img = Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))
        img.save(tmp_path / "x.png")
        pv, grid = proc.process_image(img)
        ref = ref_images(images=[img], return_tensors="pt")
        assert grid.tolist() == ref["image_grid_hw"][0].tolist(), size
        assert torch.allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0), size
        messages = [{"role": "user", "content": [{"type": "image", "path": "x.png"},
                                                 {"type": "text", "text": "Is there a lesion?"}]},
                    {"role": "assistant", "content": "Yes."}]
        enc = fam.encode(_chat(tmp_path, messages), proc)
        text = proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]},
             {"role": "assistant", "content": "Yes."}], tokenize=False)
        ids = transformers_processor(proc.tokenizer, ref_images)(text=[text], images=[img], return_tensors="pt")
        assert enc.input_ids.tolist() == ids["input_ids"][0].tolist(), size
        if settings == "released" and size == (1100, 1500):
            assert int(grid.prod()) // 4 > 1000  # the large image really kept its detail


# ---- plan ------------------------------------------------------------------------------------
def test_plan_counts_the_hybrid_as_training_does():
    """The planner's trainable parameters (LoRA on the Mamba-2 in/out projections, attention and
    shared experts; expert LoRA; routers) are the ones training creates on the tiny hybrid, and its
    activations follow the layer mix: each Mamba-2 layer costs what its kind costs, and the Mamba-2
    state and chunk states are counted and printed."""
    from finetune import adapters
    from finetune.plan import format_plan, hybrid_layer_bytes, mamba_transient, plan

    fam = get_family(FAMILY)
    r = recipe("roles.llm.experts=lora", "roles.llm.router=full", "roles.llm.r=4")
    ld = fam.load(load_spec(r, dtype=torch.float32, attn="sdpa"))
    model, rp = adapters.apply_roles(ld.model, fam, r)
    real = {row["role"]: row["trainable"] for row in adapters.role_table(model, fam, rp)}
    p = plan(r)
    assert {line.role: line.trainable for line in p.roles} == real
    hy = p.hybrid
    assert (hy.mamba, hy.attention, hy.moe) == (2, 1, 2)
    tokens = r.data.max_tokens
    kinds = hybrid_layer_bytes(hy, 64, 4)
    want = sum(getattr(hy, k) * b for k, b in kinds.items()) * tokens + mamba_transient(hy, tokens)
    assert p.activations_full == pytest.approx(want)
    assert kinds["mamba"] != kinds["attention"] != kinds["moe"]  # not one uniform layer
    text = format_plan(p)
    assert "2 Mamba-2, 1 attention, 2 MoE layers" in text and "Mamba-2 state 4x16x16 fp32" in text


def test_plan_of_the_real_model_at_4096_tokens():
    """Nemotron-3-Nano-Omni's shipped config at 4096 tokens with checkpointing: 33.0B parameters
    (31.6B outside the towers, NeMo AutoModel's trainable count with frozen towers); bitsandbytes
    leaves the fused experts (29.3B) in bf16, so QLoRA does not fit one 24 GB GPU without offload,
    and ZeRO-3 with offload does."""
    from finetune.plan import plan
    from finetune.recipe import load_recipe

    for quant in ("none", "4bit"):
        r = load_recipe("medical-nemotron-omni", ["model.path=config:nemotron_3_nano_omni_30b_a3b",
                                                   f"model.quantize={quant}", "train.distributed=auto"])
        one = plan(r, 24, 1)
        total = sum(line.params for line in one.roles)
        assert total == pytest.approx(33.0e9, rel=0.01)
        towers = sum(line.params for line in one.roles if line.role.startswith(("vision", "audio")))
        assert total - towers == pytest.approx(31.6e9, rel=0.01)
        assert not one.fits and one.settings.max_tokens == 4096 and one.settings.gradient_checkpointing
        offload = {name: (peak, fits) for name, peak, _, fits in one.strategies}["zero3-offload"]
        assert offload[1]
        if quant == "4bit":
            assert one.experts_16bit == pytest.approx(29.3e9, rel=0.01)
            assert one.peak > 60 * 1024 ** 3  # the bf16 experts alone are 55 GiB


FRESH = r'''
import sys, torch
from transformers import NemotronH_Omni_Reasoning_V3
assert not any(m == "finetune" or m.startswith("finetune.") for m in sys.modules)
model = NemotronH_Omni_Reasoning_V3.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
'''


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_with_transformers_alone(tmp_path, small_demo):
    """A merged export of the tiny recipe trained with packing loads with
    NemotronH_Omni_Reasoning_V3 in a process that never imports the toolkit, and answers an
    image+audio prompt as the adapter model does (1e-4)."""
    from peft import PeftModel

    from conftest import tiny_overrides
    from finetune.export import export_run
    from finetune.recipe import load_recipe
    from finetune.train import read_split, train

    fam = get_family(FAMILY)
    r = load_recipe("medical-nemotron-omni-tiny", tiny_overrides(tmp_path, small_demo, "train.max_steps=3",
                                                                  "train.lr=5e-3", "roles.llm.experts=lora"))
    assert r.data.packing
    run = train(r)
    out = export_run(run)["merged"]
    assert json.loads((out / "export_manifest.json").read_text())["verify"]["passed"]
    loaded = fam.load(load_spec(r, quantize="none", dtype=torch.float32, attn="sdpa"))
    ref_model = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).eval()
    samples, _ = read_split(r.data.eval, r)
    s = next(x for x in samples if {"image", "audio"} <= x.modalities())
    enc = fam.encode(s, loaded.processor)
    batch = fam.collate_padded([enc], loaded.processor.pad_id)
    batch.pop("labels")
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "l.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        want = ref_model(**batch).logits
    assert float((torch.load(tmp_path / "l.pt") - want).abs().max()) <= 1e-4


# ---- the optional audio branch ---------------------------------------------------------------
def test_a_checkpoint_without_audio_branch(loaded, media_dir, tmp_path):
    """The audio branch is optional in the config: without `audio_config` every parameter still has
    a role (no audio roles), and an audio part is a located data error before training (the model
    would leave its placeholders as plain embeddings), counted or encoded."""
    import dataclasses

    from finetune.data.schema import DataError
    from finetune.plan import CONFIG_DIR

    fam = get_family(FAMILY)
    cfg = json.loads((CONFIG_DIR / fam.shipped_configs[0]).read_text())
    cfg.pop("audio_config")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = fam.meta_model(tmp_path / "config.json")
    assert all(fam.role_of(n) for n, _ in model.named_parameters())
    assert set(fam.present_roles(model)) == {"llm", "embeddings", "lm_head", "vision_encoder", "vision_projector"}
    proc = dataclasses.replace(loaded.processor, has_audio=False)
    s = sample(media_dir, [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}])
    for call in (fam.count_tokens, fam.encode):
        with pytest.raises(DataError) as err:
            call(s, proc)
        assert (err.value.file, err.value.line) == (s.source, s.line) and "audio" in err.value.problem
    assert fam.encode(sample(media_dir, [{"type": "text", "text": "Hi."}]), proc).num_tokens > 0


def test_random_checkpoint_keeps_the_first_layers_of_the_hybrid(loaded, tmp_path):
    """gpu_step's reduced real shape: `llm_layers` keeps the first layers of the hybrid pattern (the
    depth is the layer-kind list; NemotronHConfig ignores num_hidden_layers), every kind included."""
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    fam = get_family(FAMILY)
    fam.random_checkpoint(loaded.base_path / "config.json", tmp_path / "m", torch.float32, llm_layers=3)
    cfg = NemotronH_Omni_Reasoning_V3_Config.from_pretrained(str(tmp_path / "m"))
    assert cfg.text_config.layers_block_type == ["linear_attention", "moe", "full_attention"]
    assert cfg.text_config.num_hidden_layers == 3
