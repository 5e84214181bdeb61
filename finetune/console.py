"""A console a person can read: a progress bar, a summary line every N steps, one notice per cause.

The Trainer's own printer writes its metrics dict at every logging step (1,700 of them in the
CPU demo); the full record stays in metrics.jsonl and TensorBoard, the console gets tens of
lines: `step 340/1700  loss 0.5123  lr 1.93e-03  5,210 tokens/s  1:05 elapsed, 4:20 left` (the loss is the
mean of the steps since the previous line, the rate over the same steps).
On a terminal a progress bar carries the same figures between the lines.

The learning rate shown is the LLM's (roles.llm.lr, else train.lr: the rate a recipe is tuned by),
at the rate that step used; transformers logs the first optimizer group's, which is whichever
role's parameters come first in the model (a vision encoder trained in full at its own rate, say).
Every group follows the same schedule, so the LLM's is the logged rate times the ratio of the
peaks. During warmup the line says so: transformers' warmup starts at 0, so step 1 runs at 0.
"""

from __future__ import annotations

import math
import sys
import time

from finetune.recipe import recipe_provenance


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def console_callback(every: int = 0, bar: bool | None = None, main_lr: float | None = None):
    """The Trainer callback: a summary line every `every` optimizer steps (0: about 20 a run)
    and, on a terminal (`bar` None: when stderr is one), a progress bar between them. `main_lr`:
    the peak rate of the LLM's group (None: the group with the most parameters)."""
    from transformers import TrainerCallback

    class Console(TrainerCallback):
        def __init__(self):
            self.every, self.bar, self.pbar = every, bar, None
            self.last: dict = {}
            self.losses: list[float] = []  # logged since the last summary line (the line shows their mean)
            self.mark = None  # (time, tokens) at the last summary line
            self.scale = None  # the LLM's peak rate over the logged (first) group's, at the first log

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

        def _scale(self, optimizer) -> float:
            """The LLM's (or the largest group's) peak rate over the first group's, from the
            scheduler's record of each group's peak (`initial_lr`)."""
            groups = getattr(optimizer, "param_groups", None) or []
            peaks = [g.get("initial_lr") for g in groups]
            if not peaks or not all(peaks):
                return 1.0
            main = main_lr
            if main is None:
                main = peaks[max(range(len(groups)), key=lambda i: sum(p.numel() for p in groups[i]["params"]))]
            return main / peaks[0]

        def _lr(self, args) -> str:
            lr = self.last.get("learning_rate", 0.0) * self.scale
            # train.py sets args.warmup_steps from train.warmup_ratio when it makes the scheduler;
            # transformers' `constant` schedule has no warmup
            kind = getattr(args, "lr_scheduler_type", "")
            warmup = 0 if getattr(kind, "value", kind) == "constant" else int(getattr(args, "warmup_steps", 0) or 0)
            step = int(self.last.get("step", 0))
            if warmup and 0 < step <= warmup:
                return f"{lr:.2e} (warmup {step}/{warmup})" if lr else f"0 (warmup {step}/{warmup}, from 0)"
            return f"{lr:.2e}"

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
            self.last["step"] = state.global_step
            if self.scale is None:
                self.scale = self._scale(kw.get("optimizer"))
            if "loss" in logs:
                self.losses.append(float(logs["loss"]))
            now, tokens = time.time(), self.last.get("num_tokens")
            rate = None
            if tokens is not None and self.mark[1] is not None and now > self.mark[0]:
                rate = (tokens - self.mark[1]) / (now - self.mark[0])
            if self.pbar is not None:
                post = {"loss": f"{self.last.get('loss', float('nan')):.4f}", "lr": self._lr(args)}
                if rate is not None:
                    post["tok/s"] = f"{rate:,.0f}"
                self.pbar.set_postfix(post, refresh=False)
            step, total = state.global_step, state.max_steps
            if step - self.printed >= self.every or step == total:
                done = step - self.step0
                elapsed = now - self.t0
                left = elapsed / done * (total - step) if done else 0.0
                loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
                line = f"step {step}/{total}  loss {loss:.4f}  lr {self._lr(args)}"
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


def system_prompt_lines(recipe, prompt: str | None, samples: list) -> list[str]:
    """The start-of-run lines on the system prompt: `prompt` (the processor's, what is rendered on a
    sample without a system turn), where it came from, how many samples carry their own; and a
    note when it was set in another recipe layer than data.train (a recipe's prompt inherited
    onto the user's own data: it still applies, since a run is what its resolved values say,
    whatever their history; the note says how to change it)."""

    src = recipe_provenance(recipe)
    where, data_from = src["data.system_prompt"], src["data.train"]
    origin = {"override": "data.system_prompt, from the command line",
              "default": "not set: the model's own chat template default"}.get(
        where, f"data.system_prompt, from {where.removeprefix('recipe:')}")
    if recipe.data.system_prompt is None and where != "default":
        origin = f"data.system_prompt null in {where.removeprefix('recipe:')}: the model's own chat template default"
    own = sum(1 for s in samples if s.messages and s.messages[0].role == "system")
    text = _quote(prompt) if prompt else "none"
    lines = [f"system prompt: {text} ({origin}) on samples without a system turn; {own} of {len(samples)} "
             "training samples have their own, which they keep"]
    if prompt and own < len(samples) and where.startswith("recipe:") and where != data_from:
        given = "an override" if data_from == "override" else f"from {data_from.removeprefix('recipe:')}"
        lines.append(f"note: this prompt was written in {where.removeprefix('recipe:')} for its own data; data.train "
                     f"is {given}: set data.system_prompt=... for your data ('' renders none, null the model's own "
                     "default)")
    return lines


def _quote(text: str) -> str:
    """A prompt as one line, in double quotes (newlines escaped)."""
    import json

    return json.dumps(text, ensure_ascii=False)
