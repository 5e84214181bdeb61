"""Shared fixtures: the tiny-model cache, a small synthetic dataset, a loaded tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMNI_FINETUNE_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: `make test` leaves these out (`make test-all` runs them): the rest of an engine matrix whose
#: representatives stay in `make test` (DDP and FSDP for kill-and-resume; DDP and ZeRO-3 for QLoRA;
#: ZeRO-3 for bf16, for the MoE thinker and for GRPO), so that `make test` (and CI) keeps within its time
EXTENDED = {
    "test_distributed.py::test_two_processes_killed_and_resumed_equal_one_process[zero2]",
    "test_distributed.py::test_two_processes_killed_and_resumed_equal_one_process[zero3-offload]",
    "test_distributed.py::test_qlora_two_processes_equal_one_process[zero2]",
    "test_distributed.py::test_qlora_two_processes_equal_one_process[fsdp]",
    "test_distributed.py::test_bf16_two_processes_keep_fp32_masters_and_equal_one_process[zero2]",
    "test_distributed.py::test_bf16_two_processes_keep_fp32_masters_and_equal_one_process[fsdp]",
    "test_distributed.py::test_sharded_variants_equal_one_process[baichuan-ddp]",
    "test_distributed.py::test_sharded_variants_equal_one_process[baichuan-zero3]",
    "test_distributed.py::test_two_nodes_of_one_process_equal_two_processes_on_one_node",
    # DPO and GRPO: DDP for DPO and ZeRO-3 for GRPO (its rollouts with idle media) stay in make test
    "test_distributed.py::test_dpo_and_grpo_two_processes_equal_one_process[dpo-zero3]",
    "test_distributed.py::test_dpo_and_grpo_two_processes_equal_one_process[grpo-ddp]",
    "test_distributed.py::test_dpo_and_grpo_two_processes_equal_one_process[dpo-fsdp]",
    "test_distributed.py::test_dpo_and_grpo_two_processes_equal_one_process[grpo-fsdp]",
    # kill -9 in a preference stage: DPO stays; the transformers example's video: Gemma 4 and Qwen2.5-Omni stay
    "test_stages.py::test_a_dpo_or_grpo_stage_killed_resumes_with_the_same_losses[grpo]",
    "test_export.py::test_the_transformers_example_answers_video_as_eval_does[qwen3_omni_moe]",
    "test_export.py::test_the_transformers_example_answers_video_as_eval_does[nemotron_omni]",
    # CI's time (1745 s of tests at e57dc0f): ZeRO-3 stays under kill-and-resume through QLoRA, bf16, the MoE
    # thinker and GRPO; FSDP's padded rows and DPO under DDP were measured and stay in make test-all
    "test_distributed.py::test_two_processes_killed_and_resumed_equal_one_process[zero3]",
    "test_distributed.py::test_sharded_variants_equal_one_process[padded-fsdp]",
    "test_distributed.py::test_dpo_and_grpo_two_processes_equal_one_process[dpo-ddp]",
}


def pytest_collection_modifyitems(config, items):
    import torch

    extended = pytest.mark.extended
    for item in items:
        if item.nodeid.rsplit("/", 1)[-1] in EXTENDED or item.get_closest_marker("quality") is not None:
            item.add_marker(extended)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: that also matches a folder named gpu
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic medical dataset (24 train, 12 eval samples)."""
    from finetune.demo_data import generate_medical

    return generate_medical(tmp_path_factory.mktemp("demo"), n_train=24, n_eval=12, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen():
    """(family, loaded) for the tiny Qwen2.5-Omni thinker in float32."""
    import torch

    from finetune.families import get_family
    from finetune.models import load_spec
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", ["model.max_pixels=12544"])
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    loaded.model.eval()
    return fam, loaded


def tiny_recipe(tmp_path: Path, demo: dict, *overrides: str):
    """medical-tiny on the small dataset, writing into tmp_path/run."""
    from finetune.recipe import load_recipe

    return load_recipe("medical-tiny", tiny_overrides(tmp_path, demo, *overrides))


def tiny_overrides(tmp_path: Path, demo: dict, *overrides: str) -> list[str]:
    """The overrides behind tiny_recipe (also for `python -m finetune ... medical-tiny <overrides>`)."""
    base = [f"data.train={demo['train']}", f"data.eval={demo['eval']}", "data.demo=",
            f"output.dir={tmp_path / 'run'}", "model.max_pixels=12544", "train.batch_size=1",
            "data.max_tokens=256", "data.packing=true", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1", "eval.max_samples=6",
            "eval.max_new_tokens=6"]
    return base + list(overrides)


def demo_pairs(demo: dict, folder, split: str = "train") -> str:
    """The small demo's samples of `split` as preference pairs (demo_data.preference_pairs), written
    to `folder` with their media paths made absolute."""
    import json
    from pathlib import Path

    from finetune.demo_data import preference_pairs

    root = Path(demo[split]).parent
    rows = [json.loads(line) for line in Path(demo[split]).read_text().splitlines() if line.strip()]
    for r in rows:
        for m in r["messages"]:
            for part in m["content"] if isinstance(m["content"], list) else []:
                if "path" in part:
                    part["path"] = str(root / part["path"])
    out = Path(folder) / f"{split}_pairs.jsonl"
    out.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(rows)))
    return str(out)


#: each family's tiny recipe (the one `make finetune RECIPE=...` runs on the CPU)
TINY_RECIPES = {"qwen2_5_omni": "medical-tiny", "baichuan_omni": "medical-baichuan-tiny",
                "qwen3_omni_moe": "medical-qwen3-omni-tiny", "gemma3n": "medical-gemma3n-tiny",
                "gemma4": "medical-gemma4-tiny", "nemotron_omni": "medical-nemotron-omni-tiny"}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, small_demo):
    """family -> a run folder of 3 training steps (lr 5e-3: the adapter moves the answers) on the
    small demo data, trained once per session on first use: for the tests that use a trained run."""
    runs: dict[tuple, Path] = {}

    def run_of(family: str, *overrides: str) -> Path:
        """The run of `family` (with `overrides`, e.g. model.quantize=4bit: a run of its own)."""
        key = (family, *overrides)
        if key not in runs:
            from finetune.recipe import load_recipe
            from finetune.train import train

            tmp = tmp_path_factory.mktemp(f"run-{family}")
            recipe = load_recipe(TINY_RECIPES[family], tiny_overrides(tmp, small_demo, "train.max_steps=3",
                                                                      "train.save_steps=3", "train.lr=5e-3",
                                                                      *overrides))
            runs[key] = Path(train(recipe))
        return runs[key]

    return run_of


@pytest.fixture()
def media_dir(tmp_path):
    """Two images, a WAV, a folder of frames and an MP4 with sound (media_samples.write_media)."""
    from media_samples import write_media

    return write_media(tmp_path)


@pytest.fixture(scope="session")
def policy():
    """For the DPO and GRPO exactness tests: the tiny Qwen2.5-Omni thinker with LoRA on the LLM and
    both encoders (B perturbed, so the policy differs from its reference), and the label-token head
    as training installs it."""
    import torch

    from finetune import adapters
    from finetune.families import get_family
    from finetune.loss import add_label_head
    from finetune.models import load_spec
    from finetune.recipe import load_recipe
    from finetune.verify import perturb_lora_b

    fam = get_family("qwen2_5_omni")
    recipe = load_recipe("medical-tiny", ["model.max_pixels=12544", "roles.vision_encoder.mode=lora",
                                          "roles.audio_encoder.mode=lora", "roles.vision_projector.mode=frozen",
                                          "roles.lm_head.mode=frozen", "train.method=dpo"])
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    add_label_head(model.get_base_model())
    model.eval()  # no LoRA dropout: both passes see the same function
    return fam, loaded, model
