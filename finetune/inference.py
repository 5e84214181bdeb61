"""A model to talk to (layer 5): what `chat` and `serve` answer with.

`open_model(target)` loads one model: a run folder's base with its adapter (a recipe stands for
its run folder; before training, its base alone), or an export folder (`merged/`). The adapter is
switched off for the base's answers, so one model is in memory. `Assistant.sample` builds the
sample of a conversation (the turns before, the new question and its attachments) through the
dataset schema, and checks it as a dataset's samples are checked before training: the recipe's
`data.max_*` caps, the media decoded, the modalities the model takes, the sample encoded.
`Assistant.answer` answers it with evaluation's greedy generation (finetune.probes.generate), so
an answer here equals `eval`'s for the same sample.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml
from peft import PeftModel
from transformers import TextIteratorStreamer

from finetune.data.samples import check_sample
from finetune.data.schema import MEDIA_TYPES, Limits, Sample, parse_sample, set_limits
from finetune.errors import ConfigError, MissingFileError
from finetune.families import family_for
from finetune.families.base import LoadSpec
from finetune.fsutil import MARKER
from finetune.models import family_of, load_spec, processor_settings
from finetune.probes import generate
from finetune.recipe import Recipe, RecipeError, load_resolved
from finetune.recipe.run import load_run
from finetune.runtime import choose_precision, quiet_libraries, torch_dtype
from finetune.stages import final_recipe

#: max_new_tokens where no recipe says (an export folder without its recipe.yaml)
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class Turn:
    """One exchange: the question, its attachments ((kind, path) in the order given) and the answer."""

    question: str
    attachments: list[tuple[str, Path]] = field(default_factory=list)
    answer: str | None = None


class Assistant:
    """One loaded model, its adapter on (tuned) or off (base), and how its samples are built."""

    def __init__(self, *, family, loaded, model, recipe: Recipe | None, label: str, has_adapter: bool,
                 max_new_tokens: int, notes: list[str], run_dir: Path | None, limits: Limits, own: str = "base"):
        self.family, self.loaded, self.model, self.recipe = family, loaded, model, recipe
        self.own = own  # what answers when there is no adapter: the base, or a merged (tuned) export
        self.processor = loaded.processor
        self.rope = family.rope_index(loaded.model)
        self.config = family.read_config(loaded.base_path)
        self.label, self.has_adapter, self.max_new_tokens = label, has_adapter, max_new_tokens
        self.notes, self.run_dir, self.limits = notes, run_dir, limits
        self._lock = threading.Lock()

    def name(self, tuned: bool) -> str:
        """Whose answers these are: tuned or base (the adapter on or off), or, without an adapter,
        the model's own (`merged` for an export: the tuned model, merged)."""
        return ("tuned" if tuned else "base") if self.has_adapter else self.own

    @property
    def modalities(self) -> frozenset[str]:
        """The media kinds the model takes."""
        return self.family.modalities

    def sample(self, history: list[Turn], question: str, attachments=()) -> Sample:
        """The sample of the conversation so far and the new question (its attachments before its
        text, in the order given), checked as a dataset sample is: a bad attachment raises the
        DataError that names it and the fix."""
        turns = [*history, Turn(question, [(k, Path(p)) for k, p in attachments])]
        messages = []
        for t in turns:
            for kind, _ in t.attachments:
                if kind not in MEDIA_TYPES:
                    raise ConfigError(f"unknown attachment kind {kind!r}; use one of {', '.join(MEDIA_TYPES)}")
            content = [{"type": kind, "path": str(path)} for kind, path in t.attachments]
            if t.question.strip():
                content.append({"type": "text", "text": t.question})
            messages.append({"role": "user", "content": content})
            # the last answer is the one asked for: generation drops it, a stand-in keeps the schema's shape
            # (a turn answered with nothing is not kept in a history: chat and serve leave it out)
            messages.append({"role": "assistant", "content": t.answer if t is not turns[-1] else "?"})
        if not question.strip() and not turns[-1].attachments:
            raise ConfigError("ask a question (or attach an image, audio clip or video)")
        s = parse_sample({"messages": messages}, source="chat", line=len(turns), base_dir=Path.cwd(),
                         allow_outside_paths=True, max_text_chars=self.limits.max_text_chars)
        _, errors, _ = check_sample(s, self.family, self.processor, self.config, self.rope, None)
        if errors:
            raise errors[0]
        return s

    def answer(self, sample: Sample, *, tuned: bool = True, on_text: Callable[[str], None] | None = None,
               streamer=None) -> str:
        """The greedy answer to `sample` with the adapter on (tuned) or off (base); `on_text` gets
        the answer's text as it is generated, or `streamer` (transformers' streamer protocol) its
        tokens (the returned answer is eval's, whitespace trimmed)."""
        if tuned and not self.has_adapter:
            raise ConfigError(f"{self.label} has no adapter: its answers are the model's own (/base)")
        ctx = contextlib.nullcontext if tuned or not self.has_adapter else self.model.disable_adapter
        if on_text is not None:
            streamer = _Streamer(self.processor.tokenizer, on_text)
        with self._lock, ctx():  # one model: one answer at a time, the adapter switched for it alone
            return generate(self.model, self.family, self.processor, [sample], self.rope,
                            max_new_tokens=self.max_new_tokens, batch_size=1, streamer=streamer)[0]

    def stream(self, sample: Sample, *, tuned: bool = True) -> Iterator[str]:
        """The answer's text so far, each time it grows (generation runs in a thread, as
        transformers' TextIteratorStreamer is meant to be used); the last text yielded is
        `answer`'s, and a failure of the generation is raised here."""
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run():
            try:
                result["answer"] = self.answer(sample, tuned=tuned, streamer=streamer)
            except BaseException as e:  # handed to the caller below; the iterator must still end
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=run, name="finetune-answer", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            worker.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]

    def ask(self, history: list[Turn], question: str, attachments=(), *, tuned: bool = True,
            on_text: Callable[[str], None] | None = None) -> Turn:
        """Build, check and answer one question; the new Turn (not yet added to `history`)."""
        s = self.sample(history, question, attachments)
        return Turn(question, [(k, Path(p)) for k, p in attachments],
                    self.answer(s, tuned=tuned, on_text=on_text))


class _Streamer:
    """transformers' streamer protocol: the prompt skipped, the new tokens decoded as they come
    and handed on whole words at a time (transformers' TextStreamer does the decoding)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        from transformers import TextStreamer

        class Forward(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if text:
                    on_text(text)

        self._inner = Forward(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value):
        self._inner.put(value)

    def end(self):
        self._inner.end()


def is_export_folder(path: str | Path) -> bool:
    """A model folder (config.json) that is not a run folder: an export such as runs/x/merged.
    (An export carries its recipe.yaml too, so that file does not make a folder a run; a run
    folder has no config.json and bears the toolkit's marker.)"""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / MARKER).exists()


def _device_dtype(setting: str, device: str | None) -> tuple[str, torch.dtype]:
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(setting) if dev == "cuda" else "fp32"
    return dev, torch_dtype(precision)


def _export_recipe(folder: Path) -> tuple[dict, str | None, bool]:
    """From an export's recipe.yaml: the recipe mapping, the system prompt training used and
    whether its text was left out of the export (export.include_data_details: false)."""
    path = folder / "recipe.yaml"
    if not path.is_file():
        return {}, None, False
    text = path.read_text(encoding="utf-8")
    doc = yaml.safe_load(text) or {}
    body = doc.get("recipe", doc) if isinstance(doc, dict) else {}
    data = body.get("data") or {}
    left_out = "system prompt's text left out" in text.split("\n", 2)[0]
    return body, data.get("system_prompt"), left_out


def open_model(target: str, overrides=(), *, system: str | None = None, device: str | None = None) -> Assistant:
    """The model `target` names, loaded once: a run folder (or its recipe.yaml), a recipe (its run
    folder; before training, its base alone), or an export folder. `system` replaces the system
    prompt (a run's is its recipe's data.system_prompt; an export carries the text only when
    exported with export.include_data_details)."""
    quiet_libraries()
    if is_export_folder(target):
        if overrides:
            raise ConfigError(f"{target} is an export folder: overrides ({overrides[0]}, ...) apply to runs and recipes")
        return _open_export(Path(target), system=system, device=device)
    try:
        run = load_run(target, overrides)
    except (RecipeError, MissingFileError) as e:
        if not Path(target).exists():
            raise
        raise ConfigError(f"{target}: neither a run folder, an export folder (config.json) nor a recipe: {e}") from None
    recipe = final_recipe(run.recipe)
    notes = list(run.notes)
    adapter = Path(run.run_dir) / "adapter"
    has_adapter = (adapter / "adapter_config.json").is_file()
    if not has_adapter:
        notes.append(f"{run.run_dir} holds no trained adapter: answering with the base model {recipe.model.path} "
                     f"(train first for the tuned answers)")
    if system is not None:
        recipe.data.system_prompt = system
    limits = Limits.of(recipe.data)
    set_limits(limits)
    family = family_of(recipe)
    dev, dtype = _device_dtype(recipe.train.precision, device)
    loaded = family.load(load_spec(recipe, dtype=dtype, attn="sdpa"))
    if dev == "cuda" and recipe.model.quantize == "none":
        loaded.model.to("cuda")
    model = PeftModel.from_pretrained(loaded.model, str(adapter)) if has_adapter else loaded.model
    model.eval()
    return Assistant(family=family, loaded=loaded, model=model, recipe=recipe, label=str(run.run_dir),
                     has_adapter=has_adapter, max_new_tokens=recipe.eval.max_new_tokens, notes=notes,
                     run_dir=Path(run.run_dir), limits=limits)


def _open_export(folder: Path, *, system: str | None, device: str | None) -> Assistant:
    body, trained_prompt, left_out = _export_recipe(folder)
    notes = []
    recipe = None
    if body:
        try:
            recipe = load_resolved(folder / "recipe.yaml")
        except (RecipeError, OSError, ValueError, yaml.YAMLError):
            recipe = None
    if system is None:
        if left_out:
            notes.append(f"{folder} does not carry the system prompt training used (the run folder's recipe.yaml "
                         "has it): answering without one; give it with --system TEXT")
            system = ""
        elif "system_prompt" in (body.get("data") or {}):
            system = trained_prompt  # as trained: the text, or null (the chat template's own)
        else:
            notes.append(f"{folder} names no system prompt: answering without one; give one with --system TEXT")
            system = ""
    settings = processor_settings(recipe) if recipe is not None else {}
    settings["system_prompt"] = system
    limits = Limits.of(recipe.data) if recipe is not None else Limits()
    set_limits(limits)
    family = family_for(str(folder))
    dev, dtype = _device_dtype(recipe.train.precision if recipe is not None else "auto", device)
    loaded = family.load(LoadSpec(path=str(folder), dtype=dtype, attn="sdpa", processor=settings))
    if dev == "cuda":
        loaded.model.to("cuda")
    loaded.model.eval()
    max_new = recipe.eval.max_new_tokens if recipe is not None else DEFAULT_MAX_NEW_TOKENS
    return Assistant(family=family, loaded=loaded, model=loaded.model, recipe=recipe, label=str(folder),
                     has_adapter=False, max_new_tokens=max_new, notes=notes, run_dir=None, limits=limits,
                     own="merged")


def describe(a: Assistant) -> str:
    """One line: what answers, on which device, with or without an adapter."""
    dev = next(a.model.parameters()).device
    quant = " (4-bit base)" if a.recipe is not None and a.recipe.model.quantize == "4bit" and a.has_adapter else ""
    what = "adapter on (/base switches it off)" if a.has_adapter else "no adapter"
    return f"{a.family.title} from {a.label}{quant} on {dev.type}, {what}"


__all__ = ["Assistant", "Turn", "open_model", "is_export_folder", "describe"]
