"""Every batch reaches the model on the model's device, float media in the model's dtype (issue 24).

The model's parameters are put on another device than the host, the fake CUDA device of
tests/fake_cuda.py (a process of its own; tensors that are cuda:0 to every check, values in host
memory), and the passes that feed the model run there as a GPU run makes them: the check before
step 1 (train.py's preflight callback, bf16 base with fp32 trained weights under autocast),
evaluation's generation and token loss, and the export's probe forward, for every tiny family.
A forward pre-hook on the model records every tensor it receives; a host tensor meeting a
device one anywhere inside fails as on a GPU."""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from finetune.models import load_spec

# several processes or a compiled library each: not in make test-fast
pytestmark = pytest.mark.slow

FAMILIES = {"qwen2_5_omni": "medical-tiny", "baichuan_omni": "medical-baichuan-tiny",
            "qwen3_omni_moe": "medical-qwen3-omni-tiny", "gemma3n": "medical-gemma3n-tiny"}


# ---- in the fake-CUDA process ----------------------------------------------------------------
def record_inputs(model) -> list:
    """Forward pre-hooks on the model (and the base model under PEFT): every tensor of each call
    as (argument path, device, dtype)."""
    import torch

    calls: list = []

    def walk(path, x, out):
        if isinstance(x, torch.Tensor):
            out.append((path, str(x.device), str(x.dtype).replace("torch.", "")))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{path}.{k}" if path else str(k), v, out)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{path}[{i}]", v, out)

    def hook(module, args, kwargs):
        seen: list = []
        walk("", list(args), seen)
        walk("", kwargs, seen)
        calls.append(seen)

    targets = [model]
    if hasattr(model, "get_base_model"):
        targets.append(model.get_base_model())
    for m in targets:
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def scenario(families: list[str], train: str, eval_: str, out: str) -> dict:
    """Per family, on cuda:0: the training model (bf16 base, fp32 trained roles) runs the check
    before step 1 as train.py's callback does (under autocast); the model evaluation loads (bf16
    base, the adapter read back, no autocast) runs evaluation's generation and token loss (base
    and tuned) and the export's probe forward. Per pass: the error it raised (None) and the
    tensors each forward call received."""
    import traceback
    from pathlib import Path

    from peft import PeftModel

    from finetune import adapters, evaluate, probes
    from finetune.families import family_for
    from finetune.recipe import load_recipe
    from finetune.callbacks import make_preflight_callback
    from finetune.data.reading import read_split
    from finetune.runtime import quiet_libraries, torch_dtype
    from finetune.trainer import load_for_training

    quiet_libraries()
    results = {}
    for name in families:
        recipe = load_recipe(FAMILIES[name], tiny_overrides_for(train, eval_, out))
        family = family_for(recipe.model.path)
        samples, _ = read_split(recipe.data.eval, recipe)
        picked = probes.pick_probes(samples)
        fam = {"float_media": list(family.float_media)}

        def run(pname, model, fn):
            calls = record_inputs(model)
            try:
                fn()
                err = None
            except Exception as e:  # noqa: BLE001 - reported to the test, with where it was raised
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in
                                    reversed(traceback.extract_tb(e.__traceback__)[-4:]))
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:1200]} (at {where})"
            fam[pname] = {"error": err, "calls": [list(c) for c in calls], "model_device":
                          str(next(model.parameters()).device), "model_dtype": str(model.dtype).replace("torch.", "")}

        # training: the check before step 1
        loaded = load_for_training(recipe, family, "bf16")
        model, _ = adapters.apply_roles(loaded.model, family, recipe, gradient_checkpointing=False)
        adapters.fp32_trainable(model)
        model.to("cuda")
        proc, rope = loaded.processor, family.rope_index(loaded.model)
        run("preflight", model, lambda: make_preflight_callback(family, proc, samples, rope, "single", "bf16")
            .on_train_begin(None, None, None, model=model))
        adapter = Path(out) / f"adapter-{name}"
        model.save_pretrained(str(adapter))
        del model, loaded

        # evaluation and the export's probes: the model as evaluate.py loads it on a GPU
        loaded = family.load(load_spec(recipe, dtype=torch_dtype("bf16"), attn="sdpa"))
        loaded.model.to("cuda")
        model = PeftModel.from_pretrained(loaded.model, str(adapter))
        rope = family.rope_index(loaded.model)
        with model.disable_adapter():
            run("generate_base", model, lambda: probes.generate(model, family, proc, picked, rope, max_new_tokens=2,
                                                                 batch_size=len(picked)))
        run("generate", model, lambda: probes.generate(model, family, proc, picked, rope, max_new_tokens=2,
                                                       batch_size=len(picked)))
        run("token_loss", model, lambda: evaluate.token_loss(model, family, proc, picked, rope, batch_size=len(picked)))
        run("probe_logits", model, lambda: probes.probe_logits(model, family, proc, picked, rope))
        results[name] = fam
        del model, loaded
    return results


def tiny_overrides_for(train: str, eval_: str, out: str) -> list[str]:
    from pathlib import Path

    return tiny_overrides(Path(out), {"train": train, "eval": eval_}, "data.num_workers=0")


# ---- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def placed(small_demo, tmp_path_factory):
    import fake_cuda

    try:
        lib = fake_cuda.build()
    except fake_cuda.FakeCudaUnavailable as e:
        pytest.skip(f"no fake CUDA device here: {e}")
    out = tmp_path_factory.mktemp("placed")
    got = fake_cuda.run("test_device_placement:scenario", list(FAMILIES), str(small_demo["train"]),
                        str(small_demo["eval"]), str(out), lib=lib, timeout=900)
    assert got["error"] is None, got["error"]["traceback"]
    return got["result"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["preflight", "generate_base", "generate", "token_loss", "probe_logits"])
def test_every_pass_feeds_the_model_on_its_device(placed, family, name):
    fam = placed[family]
    got = fam[name]
    assert got["model_device"] == "cuda:0"
    assert got["error"] is None, got["error"]
    assert got["calls"], "the model was not called"
    wrong = {(path, dev) for call in got["calls"] for path, dev, _ in call if dev != got["model_device"]}
    assert not wrong, f"host tensors handed to the model on {got['model_device']}: {sorted(wrong)}"
    media = {(path, dtype) for call in got["calls"] for path, _, dtype in call
             if path in fam["float_media"] and dtype != got["model_dtype"]}
    assert not media, f"float media not in the model's dtype {got['model_dtype']}: {sorted(media)}"
