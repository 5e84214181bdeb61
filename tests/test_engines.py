"""The engines' precision settings (finetune/engines.py), checked without launching them; the runs
under 2 processes are in test_distributed.py (bf16 under ZeRO-2, ZeRO-3 and FSDP2)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from finetune import engines
from finetune.errors import ConfigError

PRESETS = sorted((ROOT / "recipes" / "deepspeed").glob("*.json"))


def test_presets_leave_precision_to_the_toolkit():
    assert {p.stem for p in PRESETS} == {"zero2", "zero3", "zero2-offload", "zero3-offload"}
    for path in PRESETS:
        engines.check_deepspeed_config(path)
        assert not set(json.loads(path.read_text())) & set(engines.PRECISION_SECTIONS), path.name


@pytest.mark.parametrize("section, line", [
    ({"bf16": {"enabled": True}}, 3),
    ({"fp16": {"enabled": False, "loss_scale": 0}}, 3),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, 3),
    ({"bf16": True}, 3),
])
def test_a_config_that_sets_the_precision_is_refused_naming_file_and_line(tmp_path, section, line):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto", **section, "zero_optimization": {"stage": 2}}, indent=1))
    with pytest.raises(ConfigError, match=rf"mine\.json:{line}: the \"{next(iter(section))}\" section .*train\.precision"):
        engines.check_deepspeed_config(path)


def test_a_config_with_auto_precision_or_bad_json(tmp_path):
    path = tmp_path / "hf.json"
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
                                "zero_optimization": {"stage": 3}}))
    engines.check_deepspeed_config(path)  # the usual Hugging Face configs pass
    path.write_text('{"zero_optimization": {"stage": 3},}')
    with pytest.raises(ConfigError, match="hf.json: not valid JSON"):
        engines.check_deepspeed_config(path)


def _deepspeed_args(stage: int):
    config = json.loads((ROOT / "recipes" / "deepspeed" / f"zero{stage}.json").read_text())
    return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config, _dtype=torch.bfloat16),
                           fsdp_plugin_args=None)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_runs_autocast_and_never_casts_a_zero12_model(stage, precision):
    """DeepSpeed's bf16/fp16 modes cast every parameter of a ZeRO-1/2 model to 16-bit (the trained
    fp32 weights too); bf16 is on for ZeRO-3 only, where it is zero.Init's dtype for the base."""
    args = _deepspeed_args(stage)
    engines.keep_precision(args, precision)
    config = args.hf_deepspeed_config.config
    assert config["bf16"]["enabled"] is (precision == "bf16" and stage == 3)
    assert config["fp16"]["enabled"] is False
    # autocast in the engine; no module communicates in 16-bit: trained weights gather and reduce in fp32
    assert config["torch_autocast"] == {"enabled": True, "dtype": engines.AUTOCAST_DTYPE[precision],
                                        "lower_precision_safe_modules": []}
    assert args.hf_deepspeed_config._dtype == torch.float32  # float inputs reach the model as in one process


def test_fp32_runs_deepspeed_and_fsdp_without_mixed_precision():
    args = _deepspeed_args(3)
    engines.keep_precision(args, "fp32")
    config = args.hf_deepspeed_config.config
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"] and not config["torch_autocast"]["enabled"]
    fsdp = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2})
    engines.keep_precision(fsdp, "fp32")
    assert "mixed_precision_policy" not in fsdp.fsdp_plugin_args


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_gathers_each_weight_in_its_dtype_and_reduces_in_fp32(precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    args = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2})
    engines.keep_precision(args, precision)
    assert args.fsdp_plugin_args["mixed_precision_policy"] == MixedPrecisionPolicy(
        param_dtype=None, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=False)


def test_no_engine_no_change():
    args = SimpleNamespace(fsdp_plugin_args=None)
    engines.keep_precision(args, "bf16")
    engines.fsdp_forward(SimpleNamespace(is_fsdp_enabled=False))  # nothing to wrap
    assert vars(args) == {"fsdp_plugin_args": None}


def test_deepspeed_accepts_the_written_config():
    """DeepSpeed parses the sections as written (its own config classes, no process group)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_lower_precision_safe_modules
    from deepspeed.runtime.precision_config import get_bfloat16_config

    args = _deepspeed_args(3)
    engines.keep_precision(args, "bf16")
    config = args.hf_deepspeed_config.config
    assert get_torch_autocast_dtype(config) == torch.bfloat16
    assert get_lower_precision_safe_modules(config) == []
    assert get_bfloat16_config(config).enabled is True
