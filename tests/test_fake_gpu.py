"""A GPU run without a GPU (issue 24): the fake CUDA device of tests/fake_cuda.py.

Each tiny family trains one step and evaluates with `torch.cuda.is_available()` True, so the
toolkit takes every branch it takes on a GPU: bf16 chosen by `train.precision: auto`, fused
AdamW, pinned DataLoader memory, the model moved to cuda:0 by the Trainer, CUDA autocast's casting
rules, the chunked LM-head loss `token_mean_loss` selects on CUDA, evaluation's model on cuda:0.
A host tensor meeting a device one, or a dtype a CUDA kernel refuses, fails as it does on a GPU.

What the fake device cannot run (Triton kernels, bitsandbytes' 4-bit parameters on CUDA, NCCL,
timing) is listed in tests/fake_cuda.py. Tests marked xfail(strict) hold known defects that other
work fixes; they fail (XPASS) once it lands, and the mark goes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_overrides

# several processes or a compiled library each: not in make test-fast
pytestmark = pytest.mark.slow

FAMILIES = {"qwen2_5_omni": "medical-tiny", "baichuan_omni": "medical-baichuan-tiny",
            "qwen3_omni_moe": "medical-qwen3-omni-tiny", "gemma3n": "medical-gemma3n-tiny"}


# ---- in the fake-CUDA process ----------------------------------------------------------------
def scenario_step(recipe_name: str, train: str, eval_: str, out: str) -> dict:
    """`finetune train` for one step in train.precision auto, then `finetune eval`; what the
    Trainer was set up with, the step's loss, and the record of each phase (the checks before
    step 1 with loading; step 1 with its batch; evaluation)."""
    from transformers import TrainerCallback

    import fake_cuda
    from finetune import train as train_mod
    from finetune import trainer as trainer_mod
    from finetune.evaluate import evaluate
    from finetune.recipe import load_recipe

    rec = fake_cuda.RECORD
    recipe = load_recipe(recipe_name, tiny_overrides(Path(out), {"train": train, "eval": eval_}, "train.max_steps=1",
                                                     "train.precision=auto", "train.save_steps=100",
                                                     "eval.max_samples=4", "eval.max_new_tokens=3"))
    info: dict = {"phases": {}}
    marks: dict = {}

    class Phases(TrainerCallback):  # added after the check before step 1: its on_train_begin runs after it
        def on_train_begin(self, args, state, control, **kw):
            info["phases"]["checks"] = rec.since(marks["start"])
            marks["train"] = rec.as_dict()
            rec.where.clear()  # where step 1 reads device values or copies to the device
            fake_cuda.TRACE.update({"host read", "h2d pageable blocking", "h2d pinned blocking"})

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                info["phases"]["step"] = rec.since(marks["train"])
                info["step_where"] = dict(rec.where)
                fake_cuda.TRACE.clear()

    real_make = trainer_mod.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = real_make(*args, **kwargs)
        trainer.add_callback(Phases())

        def loss_branch(module, a, kw):  # token_mean_loss: the label-token head or one cross-entropy (plain)
            rec.events["label head" if kw.get("label_positions") is not None else "plain forward"] += 1

        trainer.model.register_forward_pre_hook(loss_branch, with_kwargs=True)
        info["args"] = {"bf16": trainer.args.bf16, "optim": getattr(trainer.args.optim, "value", trainer.args.optim),
                        "pin_memory": trainer.args.dataloader_pin_memory,
                        "device": str(trainer.args.device)}
        return trainer

    train_mod.make_trainer = make_trainer  # the name train.py calls
    marks["start"] = rec.as_dict()
    run = train_mod.train(recipe)
    info["losses"] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
    before = rec.as_dict()
    result = evaluate(recipe)
    info["phases"]["eval"] = rec.since(before)
    info["eval_token_loss"] = result["tuned"]["token_loss"]
    return info


def scenario_varlen(dtype: str, window: int | None, gqa: bool) -> dict:
    """finetune.kernels.varlen on cuda:0 (three packed segments, causal), forward and backward,
    against the same call on host copies; which kernel ran (the record's varlen counts)."""
    import torch

    import fake_cuda
    from finetune import kernels

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    lens, H, D = [5, 9, 3], 4, 16
    T_ = sum(lens)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    q = torch.randn(T_, H, D, dtype=dt)
    k, v = (torch.randn(T_, H // 2 if gqa else H, D, dtype=dt) for _ in range(2))
    host = [t.clone().requires_grad_() for t in (q, k, v)]
    dev = [t.to("cuda").requires_grad_() for t in (q, k, v)]
    ref = kernels.varlen(*host, cu, max(lens), causal=True, window=window)
    cu_dev = cu.to("cuda")
    before = fake_cuda.RECORD.as_dict()
    out = kernels.varlen(*dev, cu_dev, max(lens), causal=True, window=window)
    g = torch.randn_like(ref)
    gd = g.to("cuda")
    out.backward(gd)
    record = fake_cuda.RECORD.since(before)  # the call and its backward only (the comparisons read the host)
    ref.backward(g)
    tol = 1e-5 if dt == torch.float32 else 3e-2
    return {"device": str(out.device), "dtype": str(out.dtype).replace("torch.", ""),
            "out_diff": float((out.cpu().float() - ref.float()).abs().max()),
            "grad_diff": max(float((d.grad.cpu().float() - h.grad.float()).abs().max()) for d, h in zip(dev, host)),
            "tol": tol, "record": record}


def scenario_basics() -> dict:
    """What the fake device does with the operations a training step is made of."""
    import torch

    import fake_cuda

    out = {}
    x = torch.randn(4, 3).to("cuda")
    lin = torch.nn.Linear(3, 5).to("cuda")
    (lin(x) ** 2).sum().backward()
    out["grad_device"] = str(lin.weight.grad.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out["autocast_linear"] = str(lin(x).dtype)
    try:
        x + torch.ones(4, 3)
        out["host_meets_device"] = None
    except RuntimeError as e:
        out["host_meets_device"] = str(e)
    out["host_scalar_ok"] = str((x * torch.tensor(2.0)).device)
    out["host_index_ok"] = list(x[torch.tensor([0, 2])].shape)
    try:
        x.numpy()
        out["numpy"] = None
    except TypeError as e:
        out["numpy"] = str(e)
    pinned = torch.randn(3).pin_memory()
    out["pinned"] = pinned.is_pinned()
    before = fake_cuda.RECORD.as_dict()
    pinned.to("cuda", non_blocking=True)
    torch.randn(3).to("cuda")
    out["h2d"] = fake_cuda.RECORD.since(before)["h2d"]
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    tied = torch.nn.ModuleDict({"e": emb, "h": head}).to("cuda")
    out["tied"] = tied["e"].weight is tied["h"].weight
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    before = fake_cuda.RECORD.as_dict()
    opt.step()
    out["fused_adamw"] = fake_cuda.RECORD.since(before)["ops"].get("aten._fused_adamw_.default", 0)
    out["tensor_on_device"] = str(torch.tensor([1, 2], device="cuda").device)
    with torch.device("cuda"):
        out["device_context"] = str(torch.tensor([1.0]).device)
    out["item"] = float(x.sum().item()) == float(x.cpu().sum())
    out["cuda"] = [torch.cuda.is_available(), torch.cuda.is_bf16_supported(), list(torch.cuda.get_device_capability())]
    return out


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib():
    import fake_cuda

    try:
        return fake_cuda.build()
    except fake_cuda.FakeCudaUnavailable as e:
        pytest.skip(f"no fake CUDA device here: {e}")


def _run(lib, target, *args, **kwargs) -> dict:
    import fake_cuda

    got = fake_cuda.run(f"test_fake_gpu:{target}", *args, lib=lib, **kwargs)
    assert got["error"] is None, got["error"]["traceback"]
    return got["result"]


def test_the_fake_device_behaves_like_a_gpu(lib):
    got = _run(lib, "scenario_basics", timeout=300)
    assert got["grad_device"] == "cuda:0"
    assert got["autocast_linear"] == "torch.bfloat16"  # CUDA autocast's own rules
    assert "Expected all tensors to be on the same device" in got["host_meets_device"]
    assert got["host_scalar_ok"] == "cuda:0" and got["host_index_ok"] == [2, 3]  # allowed on CUDA too
    assert "cuda" in got["numpy"]
    assert got["pinned"] is True
    assert got["h2d"] == {"pinned non_blocking": 1, "pageable blocking": 1}
    assert got["tied"] is True and got["fused_adamw"] == 1
    assert got["tensor_on_device"] == got["device_context"] == "cuda:0"
    assert got["item"] is True
    assert got["cuda"] == [True, True, [9, 0]]


@pytest.fixture(scope="module")
def steps(lib, small_demo, tmp_path_factory):
    """One training step and an evaluation per family, each in its own fake-CUDA process."""
    import fake_cuda

    results = {}
    for family, recipe in FAMILIES.items():
        out = tmp_path_factory.mktemp(family)
        results[family] = fake_cuda.run("test_fake_gpu:scenario_step", recipe, str(small_demo["train"]),
                                        str(small_demo["eval"]), str(out), lib=lib, timeout=900)
    return results


def _step(steps, family):
    got = steps[family]
    assert got["error"] is None, got["error"]["traceback"]
    return got["result"]


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    *FAMILIES,
])
def test_one_training_step_and_evaluation_on_cuda(steps, family):
    got = _step(steps, family)
    assert got["args"] == {"bf16": True, "optim": "adamw_torch_fused", "pin_memory": True, "device": "cuda:0"}
    assert len(got["losses"]) == 1 and math.isfinite(got["losses"][0])
    assert math.isfinite(got["eval_token_loss"])
    step = got["phases"]["step"]
    assert step["ops"].get("aten._fused_adamw_.default", 0) >= 1  # the fused optimizer ran
    assert step["events"].get("label head", 0) == 1 and "plain forward" not in step["events"]  # CUDA's loss
    assert step["matmul_dtypes"].get("bfloat16", 0) > step["matmul_dtypes"].get("float32", 0)  # autocast
    assert sum(n for kind, n in step["h2d"].items() if kind.startswith("pinned")) > 0  # the batch came pinned
    assert got["phases"]["eval"]["ops"], "evaluation did not run on the device"


@pytest.mark.slow
def test_the_batch_is_copied_without_blocking(steps):
    h2d = _step(steps, "qwen2_5_omni")["phases"]["step"]["h2d"]
    assert h2d.get("pinned non_blocking", 0) > 0 and not any(k.endswith(" blocking") and "non" not in k
                                                            for k in h2d if k.startswith("pinned")), h2d


VARLEN = {"flash": [("bfloat16", None, False), ("bfloat16", 4, True), ("float16", None, True)],
          "fp32": [("float32", 4, True)]}


def scenario_varlens(cases: list) -> list[dict]:
    """scenario_varlen for each (dtype, window, gqa), in one process; a case that raises gives
    {"error": ...}."""
    out = []
    for case in cases:
        try:
            out.append(scenario_varlen(*case))
        except Exception as e:  # noqa: BLE001 - reported to the test of that case
            out.append({"error": f"{type(e).__name__}: {e}"})
    return out


@pytest.fixture(scope="module")
def varlens(lib):
    """kernels.varlen on cuda:0 for every case: on a compute-capability 9.0 device, and bf16 on 7.5."""
    got = {cap: _run(lib, "scenario_varlens", [c for cases in VARLEN.values() for c in cases] if cap == (9, 0)
                     else [("bfloat16", 4, True)], timeout=600, capability=cap) for cap in ((9, 0), (7, 5))}
    flat = [c for cases in VARLEN.values() for c in cases]
    return {**{(case, (9, 0)): r for case, r in zip(flat, got[(9, 0)])}, (("bfloat16", 4, True), (7, 5)): got[(7, 5)][0]}


@pytest.mark.parametrize("case", VARLEN["flash"], ids=lambda c: "-".join(map(str, c)))
def test_varlen_on_cuda_runs_torchs_flash_kernel(varlens, case):
    got = varlens[(case, (9, 0))]
    dtype = case[0]
    assert "error" not in got, got["error"]
    assert got["device"] == "cuda:0" and got["dtype"] == dtype
    assert got["out_diff"] <= got["tol"] and got["grad_diff"] <= got["tol"], got
    assert got["record"]["varlen"] == {f"forward {dtype}": 1, f"backward {dtype}": 1}, got["record"]
    assert not got["record"]["host_reads"], f"host reads in varlen on CUDA: {got['record']['host_reads']}"


@pytest.mark.parametrize("case,capability", [(("float32", 4, True), (9, 0)), (("bfloat16", 4, True), (7, 5))],
                         ids=["fp32", "capability-7.5"])
def test_varlen_on_cuda_falls_back_where_the_flash_kernel_cannot_run(varlens, case, capability):
    """fp32 inputs, or a GPU below compute capability 8.0: the flash kernel refuses them (the fake
    device refuses them as it does), so the exact device-mask path must run, with the same result."""
    got = varlens[(tuple(case), capability)]
    assert "error" not in got, got["error"]
    assert got["device"] == "cuda:0" and got["dtype"] == case[0]
    assert got["out_diff"] <= got["tol"] and got["grad_diff"] <= got["tol"], got
    assert not got["record"]["varlen"], got["record"]
