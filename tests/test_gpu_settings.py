"""What a run sets for a GPU, from stubbed device properties (no GPU here): the precision `auto`
picks per GPU generation, non-blocking copies from pinned memory, how often a step is logged."""

from __future__ import annotations

import pytest
import torch

from finetune import runtime, trainer
from finetune.errors import ConfigError


def stub_gpu(monkeypatch, capability, emulated_bf16=True):
    """A CUDA device of `capability`; `torch.cuda.is_bf16_supported()` answers True as it does on
    every CUDA GPU by default (emulation counts), unless told otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{capability[0]}{capability[1]}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or (including_emulation and emulated_bf16))
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("capability,expected", [
    ((7, 0), "fp16"),   # V100
    ((7, 5), "fp16"),   # T4, RTX 20xx, TITAN RTX
    ((8, 0), "bf16"),   # A100
    ((8, 6), "bf16"),   # RTX 30xx
    ((8, 9), "bf16"),   # RTX 40xx, L4
    ((9, 0), "bf16"),   # H100, H200
])
def test_auto_takes_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    stub_gpu(monkeypatch, capability)
    assert runtime.choose_precision("auto") == expected


def test_explicit_bf16_on_an_emulating_gpu_is_refused_before_loading(monkeypatch):
    stub_gpu(monkeypatch, (7, 5))
    with pytest.raises(ConfigError, match="only emulates bfloat16.*train.precision=fp16"):
        runtime.choose_precision("bf16")
    assert runtime.choose_precision("fp16") == "fp16"


def test_cpu_auto_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.choose_precision("auto") == "fp32"
    assert runtime.choose_precision("bf16") == "bf16"  # CPU autocast: the bf16 stand-in for a GPU run


def test_gpu_runs_copy_batches_without_blocking_and_log_every_tenth_step(monkeypatch):
    from finetune.recipe import load_recipe

    recipe = load_recipe("medical-tiny")
    stub_gpu(monkeypatch, (9, 0))
    dev = trainer.device_settings(recipe)
    assert dev["dataloader_pin_memory"] and dev["accelerator_config"]["non_blocking"] and not dev["use_cpu"]
    assert trainer.logging_steps(recipe) == trainer.GPU_LOGGING_STEPS > 1
    assert trainer.logging_steps(load_recipe("medical-tiny", ["train.logging_steps=3"])) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.logging_steps(recipe) == 1
    assert trainer.device_settings(recipe)["use_cpu"]
