"""The CPU setup of the LLaMA-Factory comparison (issue 13), through our real training command.

    python bench/cpu_peer.py                          # this tree, padded and packed, 5 interleaved rounds
    python bench/cpu_peer.py --against /tmp/old       # and another checkout of the toolkit, side by side

The setup: the tiny full Qwen2.5-Omni (`tiny:qwen2_5_omni-full`), 200 demo samples (image, image
+ audio, text), LoRA r8 alpha 16, dropout 0, on q/k/v/o/gate/up/down of the LLM only (encoders and
projectors frozen), fp32, gradient checkpointing on; padded batches of 4 samples, or packed rows
of at most 1024 tokens (one row a step, samples isolated). Each run is `python -m finetune train`
in a fresh process for two epochs; real tokens per second is the run's trained tokens (the
collator's count) over the Trainer's `train_runtime` (the data checks before step 1 and the model
load are not in it), and over the whole command's wall time (start-up included). Runs of each tree and mode are interleaved round by round, and the
table shows the median and the range. Absolute figures only hold on the machine they were
measured on; ratios between rows of one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = {
    "padded, batch 4": ["data.packing=false", "train.batch_size=4"],
    "isolated packing 1024": ["data.packing=true", "data.max_tokens=1024", "train.batch_size=1"],
}


def overrides(data: Path, out: Path) -> list[str]:
    return [f"data.train={data / 'train.jsonl'}", "data.eval=", "data.demo=", f"output.dir={out}",
            "model.path=tiny:qwen2_5_omni-full", "roles.llm.r=8", "roles.llm.alpha=16", "roles.llm.dropout=0",
            "roles.llm.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "roles.vision_encoder.mode=frozen", "roles.vision_projector.mode=frozen", "roles.lm_head.mode=frozen",
            "train.precision=fp32", "train.gradient_checkpointing=true", "train.epochs=2", "train.grad_accum=1",
            "train.save_steps=100000", "train.logging_steps=1", "train.resume=never", "train.warmup_ratio=0"]


def run(tree: Path, data: Path, mode: list[str], tmp: Path, tag: str) -> tuple[float, float]:
    """Real tokens per second of one `finetune train` run of `tree`: over the Trainer's runtime,
    and over the whole command (start-up, data checks and model load included)."""
    out = tmp / tag
    env = dict(os.environ, PYTHONPATH=str(tree), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "finetune", "train", "medical-tiny", *overrides(data, out), *mode],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{tree}: training failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(r.get("num_tokens", 0) for r in recs)
    runtime = next(r["train_runtime"] for r in recs if "train_runtime" in r)
    return float(tokens) / float(runtime), float(tokens) / wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout of the toolkit, measured in the same rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from finetune.demo_data import generate_medical

    trees = {"this tree": ROOT}
    if args.against:
        trees = {f"{args.against}": args.against.resolve(), **trees}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_medical(tmp / "data", n_train=200, n_eval=0, seed=0)
        got: dict = {}
        wall: dict = {}
        for r in range(args.rounds):
            for mode in args.modes:
                for name, tree in trees.items():
                    rate, whole = run(tree, tmp / "data", MODES[mode], tmp, f"{abs(hash(name))}-{r}-{len(mode)}")
                    got.setdefault((name, mode), []).append(rate)
                    wall.setdefault((name, mode), []).append(whole)
                    print(f"round {r + 1}: {name:<12} {mode:<22} {rate:9,.0f} tokens/s ({whole:,.0f} over the "
                          "whole command)", file=sys.stderr, flush=True)
    print("| tree | mode | real tokens/s (train_runtime), median | range | over the whole command, median | runs |")
    print("|---|---|---|---|---|---|")
    for (name, mode), v in got.items():
        print(f"| {name} | {mode} | {statistics.median(v):,.0f} | {min(v):,.0f}-{max(v):,.0f} | "
              f"{statistics.median(wall[(name, mode)]):,.0f} | {len(v)} |")
    if args.against:
        print()
        print("| mode | this tree / other, median of per-round ratios (train_runtime) | (whole command) |")
        print("|---|---|---|")
        other = str(args.against)
        for mode in args.modes:
            ratios = [a / b for a, b in zip(got[("this tree", mode)], got[(other, mode)])]
            wr = [a / b for a, b in zip(wall[("this tree", mode)], wall[(other, mode)])]
            print(f"| {mode} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                  f"{statistics.median(wr):.2f}x ({min(wr):.2f}-{max(wr):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
