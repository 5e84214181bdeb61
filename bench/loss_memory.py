"""The loss over the vocabulary: one cross-entropy on full logits vs TRL's chunked LM head.

    python bench/loss_memory.py                 # CPU: the tiny vocabulary and Qwen2.5-Omni's 152k
    python bench/loss_memory.py --tokens 4096   # on a GPU: add --device cuda (TRL's Triton kernel)

For each vocabulary size, the loss of `tokens` hidden states through an LM head and its backward
(gradients of the hidden states and of the head), computed two ways: `plain` materialises the
fp32 logits (tokens x vocabulary) and takes one cross-entropy; `chunked` is TRL's
ChunkedLogProbFunction (what `fused_lm_head=True` runs), which never holds more than a chunk of
logits and recomputes them in backward. Each way runs in its own process, so its peak resident
memory (CPU) or peak allocated memory (CUDA) is its own; time is the median of the repeats.
The two losses and gradients are compared in one process (max |difference|). The trainer uses
the chunked head on CUDA, and off CUDA wherever the logits exceed train.PLAIN_LOSS_MAX_LOGITS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def inputs(tokens: int, hidden: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[: tokens // 4] = -100  # prompt tokens
    return h, w, labels


def loss_of(kind: str, h, w, labels):
    if kind == "plain":
        logits = (h @ w.t()).float()
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != -100
    log_probs = ChunkedLogProbFunction.apply(h, w, None, labels.clamp(min=0), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                             None, 1.0, ("log_probs",))[0]
    return -(log_probs * mask).sum()


def _resident_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux). ru_maxrss would not do: it keeps the parent's
    high-water mark across fork and exec, so a child of a large process reads the parent's peak."""
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":"))) / 1024


def one(kind: str, tokens: int, hidden: int, vocab: int, device: str, repeats: int) -> dict:
    """In a fresh process: peak memory and median time of forward + backward."""
    h, w, labels = inputs(tokens, hidden, vocab, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        base = _resident_mb("VmRSS") * 2 ** 20
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        loss_of(kind, h, w, labels).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else _resident_mb("VmHWM") * 2 ** 20) - base
    return {"peak_mb": peak / 2 ** 20, "ms": 1000 * statistics.median(times)}


def measure(kind: str, tokens: int, hidden: int, vocab: int, device: str, repeats: int = 5) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import json, loss_memory as m; "
            f"print(json.dumps(m.one({kind!r}, {tokens}, {hidden}, {vocab}, {device!r}, {repeats})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def difference(tokens: int, hidden: int, vocab: int, device: str) -> tuple[float, float]:
    """max |loss difference| (relative) and max |gradient difference| between the two ways."""
    out = {}
    for kind in ("plain", "chunked"):
        h, w, labels = inputs(tokens, hidden, vocab, device)
        loss = loss_of(kind, h, w, labels)
        loss.backward()
        out[kind] = (float(loss), h.grad.clone(), w.grad.clone())
    (lp, hp, wp), (lc, hc, wc) = out["plain"], out["chunked"]
    return abs(lp - lc) / abs(lp), max(float((hp - hc).abs().max()), float((wp - wc).abs().max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, nargs="*", default=[640, 152064], help="vocabulary sizes")
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args(argv)
    print(f"{args.tokens} tokens, hidden {args.hidden}, fp32, {args.device}; peak = memory above the inputs")
    print()
    print("| vocabulary | fp32 logits | plain: peak MB | plain: ms | chunked: peak MB | chunked: ms | "
          "loss diff (rel.) | max grad diff |")
    print("|---|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        p = measure("plain", args.tokens, args.hidden, vocab, args.device)
        c = measure("chunked", args.tokens, args.hidden, vocab, args.device)
        dl, dg = difference(args.tokens, args.hidden, vocab, args.device)
        logits_mb = args.tokens * vocab * 4 / 2 ** 20
        print(f"| {vocab:,} | {logits_mb:,.0f} MB | {p['peak_mb']:,.0f} | {p['ms']:.1f} | {c['peak_mb']:,.0f} | "
              f"{c['ms']:.1f} | {dl:.1e} | {dg:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
