"""`make gpu-check`: every GPU check of the project in one command (at most ~8 minutes on one
H100/H200), offline, writing bench/results/<date>-<gpu>.md.

    make gpu-check                                  # on a machine with a CUDA GPU
    python bench/gpu_check.py --smoke               # the same driver on the CPU, tiny and short (CI)

Parts, each with its own time limit so one slow part cannot take the others' time:
  1. the GPU-marked tests (`pytest -m gpu`): packed = one-by-one on CUDA kernels (bf16), the
     host-sync count on CUDA;
  2. `python -m finetune verify packing medical-tiny` on CUDA;
  3. bench/gpu_step.py: every family's real shapes (random weights; Qwen3-Omni-30B-A3B with the decoder
     layers that fit 24 GB of bf16 weights), LoRA bf16 and QLoRA 4-bit, packed
     rows of 4096 tokens: tokens/s, MFU, measured peak memory beside the planner's;
  4. bench/step_split.py on the CPU demo recipe: where a GPU step's time goes;
  5. bench/packing.py --size small: packed vs padded throughput on the demo and long-tail mixtures;
  6. bench/loss_memory.py on CUDA: full logits vs TRL's chunked head (Triton), memory and time;
  6b. bench/gpu_vllm.py: vLLM serves the merged tiny Qwen2.5-Omni and Qwen3-Omni exports with our greedy
     answers (reports "skipped" at once where vLLM is not installed, as on the lent machines);
  7. a few steps of each engine on CUDA in one process: DeepSpeed ZeRO-2, ZeRO-3 with a 4-bit base,
     ZeRO-3-offload (when deepspeed is installed), FSDP2, and the tiny Qwen3-Omni (LoRA on its
     fused experts, trained routers) under ZeRO-3 with a 4-bit base.

MFU, as bench/gpu_step.py's step_flops defines it: the LLM's 6N FLOPs per token with gradient
checkpointing (2N forward, 2N backward for the inputs' gradients under LoRA, 2N recompute; 4N
without checkpointing), plus the media towers' forward (2 x their parameters per position),
over the GPU's dense bf16 peak (--peak-tflops; H100/H200 SXM: 989). Attention products are not
counted.

On a machine without the locked packages (the lent GPU machines have torch and nothing of
ours), `tools/gpu_wheels.sh` downloads the locked wheels here into .whl/; carry .whl and the
Makefile installs them into /tmp/site first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def part(name: str, cmd: list[str], timeout: int, log: list[str]) -> bool:
    t0 = time.time()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]))
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, ok = res.stdout + res.stderr, res.returncode == 0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, ok = out + f"\n(stopped at its {timeout} s limit)", False
    dt = time.time() - t0
    print(out[-6000:], flush=True)
    keep = [ln for ln in out.splitlines() if ln.startswith("|") or ln.startswith(("PASS", "FAIL", "max |", "loss "))
            or "passed" in ln or "failed" in ln or ln.startswith(("gpu_step", "family", "qwen2_5", "qwen3", "baichuan", "demo ",
                                                                  "long-tail", "tolerance", "relative"))]
    log += [f"## {name} ({'ok' if ok else 'FAILED'}, {dt:.0f} s)", "", f"`{' '.join(cmd)}`", "", "```", *keep[-60:],
            "```", ""]
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="on the CPU: tiny configs, one step each (tests the driver)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", type=Path, default=None, help="results file (default bench/results/<date>-<gpu>.md)")
    args = ap.parse_args(argv)
    import torch

    py = sys.executable
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu-check needs a CUDA GPU (python bench/gpu_check.py --smoke runs the driver on the CPU)")
        return 2
    gpu = torch.cuda.get_device_name() if cuda else "cpu-smoke"
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{date}-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}.md"
    log = [f"# GPU check, {date}, {gpu}", "",
           f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else "") + ". `make gpu-check` "
           "(bench/gpu_check.py); MFU as defined there (6N per LLM token with checkpointing, plus the towers' "
           f"forward, over {args.peak_tflops:.0f} TFLOP/s dense bf16).", ""]
    smoke = args.smoke
    parts = [
        ("GPU-marked tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"],
         150),
        ("verify packing on CUDA", [py, "-m", "finetune", "verify", "packing", "medical-tiny",
                                    *(["--device", "cpu"] if smoke else [])], 120),
        ("7B training steps (gpu_step)", [py, "bench/gpu_step.py", "--max-tokens", "700" if smoke else "4096",
                                          "--steps", "1" if smoke else "3", f"--peak-tflops={args.peak_tflops}",
                                          *(["--tiny", "--device", "cpu"] if smoke else [])], 330),
        ("step split, CPU demo recipe", [py, "bench/step_split.py", "--recipe", "medical-tiny",
                                         "--steps", "3" if smoke else "10"], 120),
        ("packing throughput", [py, "bench/packing.py", "--repeats", "1" if smoke else "3",
                                *([] if smoke else ["--size", "small"])], 150),
        ("loss memory", [py, "bench/loss_memory.py", "--device", "cuda" if cuda else "cpu",
                         *(["--vocab", "640", "--tokens", "256"] if smoke else ["--tokens", "4096"])], 90),
        # seconds where vLLM is absent, as on the lent machines (it cannot be carried: over 64 MiB)
        ("vLLM serves the exports", [py, "bench/gpu_vllm.py", *(["--smoke"] if smoke else [])], 600),
    ]
    import importlib.util

    # the engines on CUDA (one process: NCCL takes one rank per GPU, so 2-process runs of every
    # strategy are tested on the CPU with gloo, tests/test_distributed.py): the Trainer's own
    # DeepSpeed and FSDP2 paths, QLoRA sharded, ZeRO-3-offload (a 7B LoRA on one small GPU)
    engines = [("DeepSpeed ZeRO-2", ["train.distributed=deepspeed", "train.deepspeed=zero2"]),
               ("DeepSpeed ZeRO-3, QLoRA", ["train.distributed=deepspeed", "train.deepspeed=zero3",
                                             "model.quantize=4bit"]),
               ("DeepSpeed ZeRO-3-offload", ["train.distributed=deepspeed", "train.deepspeed=zero3-offload"]),
               ("FSDP2", ["train.distributed=fsdp"]),
               # the MoE thinker (fused experts with LoRA, trained routers) under ZeRO-3, QLoRA
               ("Qwen3-Omni MoE ZeRO-3, QLoRA", ["model.path=tiny:qwen3_omni_moe", "model.max_pixels=16384",
                                                 "roles.llm.experts=lora", "roles.llm.router=full",
                                                 "train.distributed=deepspeed", "train.deepspeed=zero3",
                                                 "model.quantize=4bit"])]
    for name, settings in engines:
        if not cuda:
            log += [f"## {name} steps", "", "not run (CPU smoke)", ""]
        elif importlib.util.find_spec("deepspeed") is None and "train.distributed=deepspeed" in settings:
            log += [f"## {name} steps", "", "not run: deepspeed is not installed here (`pip install -e "
                    "\".[deepspeed]\"`)", ""]
        else:
            launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
            parts.append((f"{name} steps", [*launch, "-m", "finetune", "train", "medical-tiny", "train.max_steps=3",
                                            "train.save_steps=2", *settings,
                                            f"output.dir=/tmp/gpu-check-{name.split(',')[0].replace(' ', '-')}"], 120))
    ok = all([part(name, cmd, t, log) for name, cmd, t in parts])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(log) + "\n")
    print(f"gpu-check: {'all parts passed' if ok else 'some parts FAILED'}; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
