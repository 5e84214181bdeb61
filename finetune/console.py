"""A console a person can read: a progress bar, a summary line every N steps, one notice per cause.

The Trainer's own printer writes its metrics dict at every logging step (1,700 of them in the
CPU demo); the full record stays in metrics.jsonl and TensorBoard, the console gets tens of
lines: `step 340/1700  loss 0.5123  lr 1.93e-03  5,210 tokens/s  1:05 elapsed, 4:20 left` (the loss is the
mean of the steps since the previous line, the rate over the same steps).
On a terminal a progress bar carries the same figures between the lines.
"""

from __future__ import annotations

import logging
import math
import sys
import time

#: bitsandbytes logs this at import on CPUs with AVX-512 BF16 when the optional `kernels` package
#: cannot fetch its faster 4-bit CPU kernel; it matters only where 4-bit runs on the CPU
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL = "Failed to load CPU gemm_4bit_forward"
_bnb_notes: list[str] = []
_bnb_told = False


class _HoldBnbKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _BNB_KERNEL in record.getMessage():
            _bnb_notes.append(record.getMessage())
            return False
        return True


def hold_library_notices() -> None:
    """Install once, before bitsandbytes is imported: its CPU-kernel notice is held back."""
    log = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _HoldBnbKernelNotice) for f in log.filters):
        log.addFilter(_HoldBnbKernelNotice())


def tell_4bit_on_cpu() -> None:
    """Where 4-bit weights really run on the CPU: say once that the slower built-in path is used."""
    global _bnb_told
    if _bnb_notes and not _bnb_told:
        _bnb_told = True
        print("note: bitsandbytes 4-bit on the CPU runs its built-in kernels (the faster `kernels` one could not "
              "be loaded; `pip install kernels` and network access bring it). Training is slower, not different.",
              flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def console_callback(every: int = 0, bar: bool | None = None):
    """The Trainer callback: a summary line every `every` optimizer steps (0: about 20 a run)
    and, on a terminal (`bar` None: when stderr is one), a progress bar between them."""
    from transformers import TrainerCallback

    class Console(TrainerCallback):
        def __init__(self):
            self.every, self.bar, self.pbar = every, bar, None
            self.last: dict = {}
            self.losses: list[float] = []  # logged since the last summary line (the line shows their mean)
            self.mark = None  # (time, tokens) at the last summary line

        def on_train_begin(self, args, state, control, **kw):
            total = state.max_steps
            if not self.every:
                self.every = max(1, math.ceil(total / 20))
            self.every = max(self.every, args.logging_steps)  # a line needs a logged step
            show = sys.stderr.isatty() if self.bar is None else self.bar
            if show and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.pbar = tqdm(total=total, initial=state.global_step, unit="step", dynamic_ncols=True,
                                 leave=False)
            self.t0, self.step0 = time.time(), state.global_step
            self.mark = (self.t0, None)
            self.printed = state.global_step

        def on_step_end(self, args, state, control, **kw):
            if self.pbar is not None:
                self.pbar.update(state.global_step - self.pbar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            if "train_runtime" in logs:  # the end-of-training record
                self._close()
                runtime = float(logs["train_runtime"])
                tokens = self.last.get("num_tokens")
                rate = f", {tokens / runtime:,.0f} tokens/s" if tokens and runtime else ""
                print(f"trained {state.global_step} steps in {_clock(runtime)}{rate}; final loss "
                      f"{self.last.get('loss', float('nan')):.4f}", flush=True)
                return
            self.last.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            if "loss" in logs:
                self.losses.append(float(logs["loss"]))
            now, tokens = time.time(), self.last.get("num_tokens")
            rate = None
            if tokens is not None and self.mark[1] is not None and now > self.mark[0]:
                rate = (tokens - self.mark[1]) / (now - self.mark[0])
            if self.pbar is not None:
                post = {"loss": f"{self.last.get('loss', float('nan')):.4f}",
                        "lr": f"{self.last.get('learning_rate', 0):.2e}"}
                if rate is not None:
                    post["tok/s"] = f"{rate:,.0f}"
                self.pbar.set_postfix(post, refresh=False)
            step, total = state.global_step, state.max_steps
            if step - self.printed >= self.every or step == total:
                done = step - self.step0
                elapsed = now - self.t0
                left = elapsed / done * (total - step) if done else 0.0
                loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
                line = f"step {step}/{total}  loss {loss:.4f}  lr {self.last.get('learning_rate', 0):.2e}"
                if rate is not None:
                    line += f"  {rate:,.0f} tokens/s"
                line += f"  {_clock(elapsed)} elapsed, {_clock(left)} left"
                self._write(line)
                self.printed = step
                self.mark = (now, tokens)
                self.losses = []
            elif self.mark[1] is None:
                self.mark = (now, tokens)

        def on_train_end(self, args, state, control, **kw):
            self._close()

        def _write(self, line: str):
            if self.pbar is not None:
                self.pbar.write(line)
            else:
                print(line, flush=True)

        def _close(self):
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None

    return Console()
