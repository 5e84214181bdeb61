"""Typed training recipes: nested dataclasses loaded from YAML, strictly checked, with provenance.

A recipe is a YAML file in ``recipes/`` (or any path). It may ``extends:`` another recipe and
is then deep-merged on top of it; ``key.path=value`` overrides from the command line are applied
last. Every problem found is reported at once in a single :class:`RecipeError`, and the loaded
:class:`Recipe` remembers, for each setting, whether it is a default, came from a recipe file or
from an override (see :func:`recipe_provenance` and :func:`save_resolved`).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import fsutil
from finetune.data.schema import Limits
from finetune.checkpoint import parse_size
from finetune.errors import ConfigError, UserError
from finetune.hub import is_hub_id

__all__ = [
    "ROLE_NAMES",
    "CHOICES",
    "RecipeError",
    "Recipe",
    "ModelConfig",
    "RoleConfig",
    "RolesConfig",
    "DataConfig",
    "DataSource",
    "TrainConfig",
    "EvalConfig",
    "ExportConfig",
    "OutputConfig",
    "role_names",
    "load_recipe",
    "load_resolved",
    "load_run",
    "RunRecipe",
    "RUN_SETTINGS",
    "save_resolved",
    "recipe_to_dict",
    "recipe_provenance",
    "list_recipes",
    "field_help",
]

ROLE_NAMES: tuple[str, ...] = (
    "llm",
    "embeddings",
    "lm_head",
    "vision_encoder",
    "vision_projector",
    "audio_encoder",
    "audio_projector",
    "audio_head",
)

DEFAULT_SOURCE = "default"
OVERRIDE_SOURCE = "override"

_DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTRIBUTED = ("auto", "ddp", "fsdp", "deepspeed")
#: data.long_audio: what happens to a clip longer than the model's processor reads (Family.max_audio_samples)
LONG_AUDIO = ("error", "split", "truncate")
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero2-offload", "zero3-offload")


def deepspeed_zero(setting: str) -> dict:
    """The zero_optimization section of a train.deepspeed JSON path ({} for a preset name, or
    when the file cannot be read here; the run's own check reports that)."""
    setting = setting.strip()
    if setting in DEEPSPEED_PRESETS:
        return {}
    try:
        zero = json.loads(Path(setting).read_text()).get("zero_optimization", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return zero if isinstance(zero, dict) else {}


def deepspeed_stage(setting: str) -> int:
    """The ZeRO stage of train.deepspeed: a preset's name, or a JSON config's zero_optimization.stage."""
    setting = setting.strip()
    if setting in DEEPSPEED_PRESETS:
        return int(setting[4])
    return int(deepspeed_zero(setting).get("stage", 0) or 0)


def shards_weights(recipe: "Recipe") -> bool:
    """True when the strategy shards the parameters themselves (ZeRO-3, FSDP), not only the
    optimizer state and gradients (ZeRO-1/2) or nothing (DDP)."""
    t = recipe.train
    return t.distributed == "fsdp" or (t.distributed == "deepspeed" and deepspeed_stage(t.deepspeed) == 3)


def _opt(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A scalar field with its help string (and allowed values, when enumerated)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(factory: Any, help: str) -> Any:
    """A nested-section field with its help string."""
    return field(default_factory=factory, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    path: str = _opt("tiny:qwen2_5_omni", "local model folder, a hub id (org/name: resolved through the HF cache, "
                                          "downloaded when missing; HF_HUB_OFFLINE=1 reads the cache only), or "
                                          "'tiny:<family>' for a random tiny model")
    revision: str = _opt("", "the hub revision (branch, tag or commit) when model.path is a hub id; '' = main")
    family: str = _opt("auto", "model family (a name in finetune/families' registry); 'auto' detects it from "
                               "the config")
    dtype: str = _opt("auto", "dtype the weights are loaded in", _DTYPES)
    quantize: str = _opt("none", "load the LLM quantized with bitsandbytes (QLoRA)", ("none", "4bit", "8bit"))
    attn: str = _opt(
        "auto",
        "attention implementation",
        ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"),
    )
    min_pixels: int = _opt(3136, "minimum pixels per image after resizing (56*56)")
    max_pixels: int = _opt(401408, "maximum pixels per image after resizing (512*28*28)")
    video_max_frames: int = _opt(16, "maximum number of frames sampled from one video")
    video_fps: float = _opt(2.0, "frames per second sampled from videos")
    use_audio_in_video: bool = _opt(
        False, "read a video file's own sound track with its frames, interleaved by time, as the model's processor "
               "does with use_audio_in_video (Qwen2.5-Omni, Qwen3-Omni; a video part's own \"use_audio_in_video\" "
               "overrides it); true for a model whose processor has no such setting is an error")
    tiny_seed: int = _opt(0, "seed used when building a random tiny model")


@dataclass
class RoleConfig:
    """How one component (role) of the model is trained."""

    mode: str = _opt("frozen", "frozen: not trained; lora: LoRA adapters; full: all weights trained", ("frozen", "lora", "full"))
    r: int = _opt(16, "LoRA rank")
    alpha: int = _opt(32, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _opt(0.05, "dropout applied to the LoRA input")
    targets: str | list[str] = _opt("all-linear", "'all-linear' or a list of module-name suffixes to adapt")
    lr: float | None = _opt(None, "learning rate for this role; null = train.lr")
    experts: str = _opt("frozen", "mixture-of-experts LLMs (roles.llm with mode lora): the fused expert weights "
                                  "frozen, or LoRA of rank r on every expert (PEFT's target_parameters)",
                        ("frozen", "lora"))
    router: str = _opt("frozen", "mixture-of-experts LLMs (roles.llm with mode lora): the routers frozen, or "
                                 "trained in full", ("frozen", "full"))


@dataclass
class RolesConfig:
    """One :class:`RoleConfig` per model component, in :data:`ROLE_NAMES` order."""

    llm: RoleConfig = _section(lambda: RoleConfig(mode="lora"), "the language model's transformer layers")
    embeddings: RoleConfig = _section(RoleConfig, "the input token embeddings")
    lm_head: RoleConfig = _section(RoleConfig, "the output projection to the vocabulary")
    vision_encoder: RoleConfig = _section(RoleConfig, "the image/video encoder")
    vision_projector: RoleConfig = _section(RoleConfig, "the projector from vision features to the LLM")
    audio_encoder: RoleConfig = _section(RoleConfig, "the audio encoder")
    audio_projector: RoleConfig = _section(RoleConfig, "the projector from audio features to the LLM")
    audio_head: RoleConfig = _section(RoleConfig, "the speech-output head (never trained by this toolkit)")

    def items(self) -> list[tuple[str, RoleConfig]]:
        """(role name, config) pairs in :data:`ROLE_NAMES` order."""
        return [(name, getattr(self, name)) for name in ROLE_NAMES]


@dataclass
class DataSource:
    """One source of samples: a file or folder, or a dataset's hub id; one entry of a mixture."""

    path: str = _opt("", "a JSONL file, a Parquet file, or a `datasets` save_to_disk folder (relative paths resolve "
                         "against the current working dir)")
    hub: str = _opt("", "a dataset's hub id (org/name), instead of path; resolved through the HF cache")
    format: str = _opt("auto", "auto: .jsonl is our chat JSONL, .parquet / a save_to_disk folder / a hub id is read "
                               "with `datasets`", ("auto", "jsonl", "hf"))
    split: str = _opt("", "the split of a hub dataset or DatasetDict folder; '' = train")
    revision: str = _opt("", "hub revision (branch, tag or commit hash); '' = main")
    columns: dict[str, str] = _opt({}, "our field -> the dataset's column: image, audio, question, answer, messages, "
                                       "system, id, task")
    weight: float = _opt(1.0, "mixtures: this source's share of each epoch's tokens, relative to the other sources' "
                              "weights (3 and 1 = 75% and 25%)")
    epochs: float | None = _opt(None, "mixtures: instead of a weight, how many times this source's tokens go into "
                                      "each epoch (0.25 = a seeded quarter of it); null = by weight")
    name: str = _opt("", "name in logs and in mixture.json; '' = the file or hub id")
    # the entry's index in the recipe's list (messages name data.train[i] as written)
    _index: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How logs name the source."""
        return self.name or self.path or self.hub


@dataclass
class DataConfig:
    """Where the training data comes from and how samples are built."""

    train: str | list[DataSource] = _opt(
        "", "training data: a JSONL file (relative paths resolve against the current working dir), one source "
            "{path|hub, format, split, revision, columns}, or a list of sources with weight or epochs (a mixture)")
    eval: str = _opt("", "held-out JSONL file; '' = none")
    demo: str = _opt("", "'medical' (the *-tiny demo recipes): generate the synthetic demo dataset when it is missing, "
                         "only while data.train is the demo's own data/demo/medical/train.jsonl (and data.eval its "
                         "eval.jsonl or ''), and only into an empty folder or one the generator made; any other "
                         "data.train generates nothing", ("", "medical"))
    system_prompt: str | None = _opt(
        None,
        "system prompt for samples without a system turn; null = what the model's own chat template adds "
        "at inference (Qwen2.5-Omni: 'You are a helpful assistant.'; Baichuan-Omni-1.5: none), '' = none",
    )
    max_tokens: int = _opt(4096, "token budget of one sample / one packed row")
    on_error: str = _opt("raise", "what to do with a broken sample", ("raise", "skip"))
    long_audio: str = _opt(
        "error", "an audio clip longer than the model's processor reads (Qwen2.5-Omni 300 s, Gemma 3n 30 s): error = "
                 "a located error naming it; split = consecutive clips of at most that length, each its own audio "
                 "item; truncate = its first part, as the processor cuts it at inference (counted and reported)",
        LONG_AUDIO)
    allow_outside_paths: bool = _opt(False, "allow media paths outside the dataset's folder")
    packing: bool = _opt(True, "pack several samples into one row of max_tokens (isolated attention; train.batch_size then counts rows)")
    num_workers: int = _opt(-1, "data-loader worker processes; -1 = auto: 4 on CUDA (decoding and encoding overlap "
                                "the GPU's step), 0 on the CPU (workers would take the step's own cores)")
    cache_gb: float = _opt(2.0, "GB of encoded samples (pixels, audio features, positions) kept in memory from one "
                                "epoch to the next, split across workers; 0 = encode on every use")
    # Caps on one input, checked before it is parsed, tokenised or decoded (sizes from file headers): a
    # small file that claims or expands to gigabytes is a located error, not a crash. Defaults: Limits.
    max_line_bytes: int = _opt(Limits.max_line_bytes, "longest JSONL line in bytes, refused before JSON parsing "
                                                      "(media belong in files named by 'path', not inline)")
    max_text_chars: int = _opt(Limits.max_text_chars, "most characters of text in one sample, refused before "
                                                      "tokenising (1,000,000 is about 250k tokens)")
    max_image_pixels: int = _opt(Limits.max_image_pixels, "most pixels of one image (DICOM, NIfTI slice, video frame) "
                                                          "from its header, before decoding; 67,108,864 = 8192 x 8192, "
                                                          "far above model.max_pixels (images are resized to that)")
    max_volume_voxels: int = _opt(Limits.max_volume_voxels, "most voxels of a NIfTI volume or multi-frame DICOM "
                                                            "from its header (536,870,912 = 512 x 512 x 2048)")
    max_audio_seconds: float = _opt(Limits.max_audio_seconds, "longest recording in seconds, from its header (at up "
                                                              "to 48 kHz: a 192 kHz file may be a quarter as long)")
    max_video_seconds: float = _opt(Limits.max_video_seconds, "longest video file in seconds, from its header")
    max_video_frames: int = _opt(Limits.max_video_frames, "most frames of one video (file, folder or list), counted "
                                                          "before decoding; 108,000 = an hour at 30 fps")

    def sources(self) -> list[DataSource]:
        """data.train as a list of sources (a plain path is one JSONL source; '' is none)."""
        if isinstance(self.train, str):
            return [DataSource(path=self.train)] if self.train else []
        return list(self.train)

    @property
    def train_label(self) -> str:
        """data.train for messages: the path, or the sources' names."""
        return self.train if isinstance(self.train, str) else " + ".join(s.label for s in self.train)


@dataclass
class TrainConfig:
    """Optimisation settings."""

    seed: int = _opt(42, "random seed")
    epochs: float = _opt(1.0, "number of passes over the training data")
    max_steps: int = _opt(-1, "stop after this many optimizer steps; -1 = use epochs")
    lr: float = _opt(2e-4, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.03, "fraction of steps used for learning-rate warmup")
    scheduler: str = _opt("cosine", "learning-rate schedule", ("cosine", "linear", "constant", "constant_with_warmup"))
    batch_size: int = _opt(1, "rows per device per step")
    grad_accum: int = _opt(8, "gradient accumulation steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 = no clipping")
    precision: str = _opt("auto", "mixed-precision mode", ("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward to save memory")
    optim: str = _opt("auto", "optimizer; auto = adamw_torch_fused on CUDA (one fused kernel for all parameters), "
                              "adamw_torch elsewhere", ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit",
                                                        "adamw_8bit"))
    router_aux_loss_coef: float | None = _opt(
        None, "mixture-of-experts LLMs: weight of the load-balancing loss, added to the loss when the experts or "
              "routers train (roles.llm.experts / router) and logged every step either way; null = the model "
              "config's router_aux_loss_coef")
    token_metrics: bool = _opt(False, "log TRL's entropy and next-token accuracy every step (softmax work over the "
                                      "vocabulary and a device read each step); the loss is the same either way")
    logging_steps: int = _opt(0, "log every N optimizer steps (metrics.jsonl, TensorBoard); 0 = auto: every step on "
                                 "the CPU, every 10 on a GPU (a logged step reads the loss and gradient norm back "
                                 "from the device, which makes the host wait for it)")
    print_every: int = _opt(0, "print a summary line every N optimizer steps; 0 = about 20 lines a run")
    save_steps: int = _opt(50, "save a checkpoint every N optimizer steps")
    save_total_limit: int = _opt(2, "number of checkpoints kept")
    resume: str = _opt("auto", "'auto' (latest checkpoint in the run folder), 'never', or a checkpoint path")
    distributed: str = _opt(
        "auto",
        "multi-process strategy under torchrun: auto (DDP when launched with several processes, else one "
        "process), ddp, fsdp (fully sharded) or deepspeed (see train.deepspeed)",
        DISTRIBUTED,
    )
    deepspeed: str = _opt(
        "zero2",
        "DeepSpeed config when train.distributed is deepspeed: zero2, zero3, zero2-offload, zero3-offload "
        "(recipes/deepspeed/<name>.json) or a path to a .json config",
    )


@dataclass
class EvalConfig:
    """Evaluation on the held-out split."""

    max_new_tokens: int = _opt(32, "tokens generated per evaluation sample")
    max_samples: int = _opt(0, "evaluate at most this many samples; 0 = all")
    batch_size: int = _opt(8, "samples generated at once")
    compare_base: bool = _opt(True, "also evaluate the base model for comparison")
    examples: int = _opt(5, "number of example generations shown in the report")
    metric: str = _opt(
        "auto",
        "how an answer is scored (a sample's own \"metric\" key wins): exact, normalised exact match; yesno, the "
        "leading yes/no word; choice, the option picked from the sample's \"options\"; open, token F1 (and ROUGE-L); "
        "auto = choice for a sample with options, yesno when the reference is yes or no, else exact",
        ("auto", "exact", "choice", "yesno", "open"),
    )
    bootstrap: int = _opt(1000, "bootstrap resamples for the 95% intervals (0 = no intervals)")
    general: str = _opt("", "held-out general JSONL set scored before and after tuning (the forgetting "
                            "check); '' = none")
    report: bool = _opt(True, "also write eval.html: metrics, loss curve, examples with media, filters")
    report_media: bool = _opt(True, "eval.html shows the examples' images and audio inline; false = the media are "
                                    "left out (the page still holds questions and answers)")


@dataclass
class ExportConfig:
    """How the fine-tuned model is exported."""

    format: str = _opt("merged", "merged: adapters merged into the weights; adapter: adapters only", ("merged", "adapter", "both"))
    dtype: str = _opt("auto", "dtype of the exported weights", _DTYPES)
    max_shard_size: str = _opt("2GB", "largest safetensors shard, e.g. '2GB' or '500MB'")
    quantize: str = _opt(
        "none",
        "also write merged-<4bit|8bit>/: the merged model quantised with bitsandbytes (NF4 / int8), checked to load",
        ("none", "4bit", "8bit"),
    )
    verify_atol: float = _opt(
        1e-4,
        "max abs logit difference accepted between merged and adapter model (the bf16 rule lives in the exporter)",
    )
    include_data_details: bool = _opt(
        False,
        "what the exports (merged/, adapter_export/) carry about the data: false = data files by name with counts, "
        "no absolute paths, sample ids, the output folder or the system prompt's text; true = the full resolved "
        "recipe, the system prompt and the probe samples' ids and file:line (the run folder keeps them either way)",
    )


@dataclass
class OutputConfig:
    """Where run artifacts are written."""

    dir: str = _opt("", "run folder; '' = runs/<recipe name>")


@dataclass
class Recipe:
    """A complete, validated training recipe."""

    name: str = _opt("", "recipe name; set from the YAML file stem when loaded")
    description: str = _opt("", "free-text description")
    model: ModelConfig = _section(ModelConfig, "base model")
    roles: RolesConfig = _section(RolesConfig, "what is trained, per model component")
    data: DataConfig = _section(DataConfig, "training data")
    train: TrainConfig = _section(TrainConfig, "optimisation")
    eval: EvalConfig = _section(EvalConfig, "evaluation")
    export: ExportConfig = _section(ExportConfig, "export")
    output: OutputConfig = _section(OutputConfig, "output location")
    # Provenance travels with the object so a run can record where each value came from, but two
    # recipes with equal values are equal whatever their history.
    _sources: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # `stages:` (finetune/stages.py): (name, the stage's own settings as written, the stage's recipe)
    _stages: list = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def stages(self) -> list[tuple[str, dict, "Recipe"]]:
        """The recipe's stages in order, each (name, its settings as written, its full recipe); [] if none."""
        return self._stages

    @property
    def run_dir(self) -> Path:
        """The run folder: ``output.dir`` if set, else ``runs/<name>``."""
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name


def role_names() -> tuple[str, ...]:
    """The role names, in canonical order."""
    return ROLE_NAMES


class RecipeError(UserError, ValueError):
    """A recipe could not be loaded; the message lists every problem, one per line.

    ``problems`` holds the same lines (without the header) for programmatic use.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


# ----------------------------------------------------------------------------------------------
# Schema introspection
# ----------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    # `from __future__ import annotations` turns annotations into strings; resolve them once.
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _public_fields(cls: type) -> list[Any]:
    return [f for f in fields(cls) if not f.name.startswith("_")]


def _walk_schema(cls: type, prefix: str = ""):
    """Yield (dotted path, dataclass field, type) for every leaf of the schema."""
    hints = _hints(cls)
    for f in _public_fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from _walk_schema(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _leaf_paths() -> list[str]:
    return [p for p, _, _ in _walk_schema(Recipe)]


def _leaf_type(parts: Sequence[str]) -> Any:
    """Annotation of the schema leaf at ``parts``, or None if it is not a leaf."""
    cls: Any = Recipe
    for part in parts:
        if not is_dataclass(cls):
            return None
        hints = _hints(cls)
        if part not in hints or part.startswith("_"):
            return None
        cls = hints[part]
    return None if is_dataclass(cls) else cls


CHOICES: dict[str, tuple[Any, ...]] = {
    path: f.metadata["choices"] for path, f, _ in _walk_schema(Recipe) if "choices" in f.metadata
}
"""Allowed values of every enumerated field, by dotted path."""


def field_help() -> dict[str, str]:
    """Help string of every leaf setting, by dotted path (for CLIs and docs)."""
    return {path: f.metadata.get("help", "") for path, f, _ in _walk_schema(Recipe)}


# ----------------------------------------------------------------------------------------------
# YAML reading
# ----------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise silently drop."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let the base class produce its own error
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------------------------
# Problems and provenance over layers
# ----------------------------------------------------------------------------------------------

# A layer is (label, nested dict); label is a file name or OVERRIDE_SOURCE. Layers are applied in
# order, so "who set this path" is answered by the last layer containing it.
_Layer = tuple[str, dict]


def _has_path(data: Any, parts: Sequence[str]) -> bool:
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _layer_index(layers: Sequence[_Layer], path: str) -> int:
    parts = []
    for part in path.split(".") if path else []:
        parts.append(re.sub(r"\[\d+\]$", "", part))
        if parts[-1] != part:  # inside a list (data.train[1].weight): the layer that set the list
            break
    for i in range(len(layers) - 1, -1, -1):
        if _has_path(layers[i][1], parts):
            return i
    return -1


def _format_error(name: str, problems: Sequence[str]) -> RecipeError:
    lines = [f"recipe {name} has {len(problems)} problem(s):", *problems]
    return RecipeError("\n".join(lines), problems)


class _Problems:
    """Collects (path, message) problems and attributes each to the layer that set the path."""

    def __init__(self, layers: Sequence[_Layer], fallback: str):
        self.layers = layers
        self.fallback = fallback
        self.items: list[tuple[str | None, str, str]] = []

    def add(self, path: str, message: str, source: str | None = None) -> None:
        self.items.append((source, path, message))

    def latest(self, *paths: str) -> str:
        """Of several related paths, the one set by the latest layer (for attributing a clash)."""
        return max(paths, key=lambda p: _layer_index(self.layers, p))

    def lines(self) -> list[str]:
        out = []
        for source, path, message in self.items:
            if source is None:
                i = _layer_index(self.layers, path)
                source = self.layers[i][0] if i >= 0 else self.fallback
            out.append(f"{source}: {path}: {message}")
        return out


# ----------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_words(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_words(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if _is_union(tp):
        return " or ".join(_type_words(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp``, or ``_NO`` if it does not fit."""
    if _is_union(tp):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        # bool is an int subclass; `r: true` is a mistake, not r=1.
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 only reads `2e-4` as a float when written `2.0e-4`, so plain
            # scientific notation arrives here as a string.
            try:
                out = float(value.strip())
            except ValueError:
                return _NO
        else:
            return _NO
        return out if math.isfinite(out) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return _NO
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            return _NO
        key_tp, value_tp = typing.get_args(tp)
        out = {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}
        return _NO if any(k is _NO or v is _NO for k, v in out.items()) else out
    if is_dataclass(tp):
        return _NO  # sections and sources are filled by _fill, which reports their own problems
    raise TypeError(f"unsupported schema type {tp!r}")  # a schema bug, not a user error


# ----------------------------------------------------------------------------------------------
# Building and checking
# ----------------------------------------------------------------------------------------------


def _unknown_key_message(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; valid keys: {', '.join(valid)}"


def _fill(obj: Any, raw: dict, prefix: str, problems: _Problems) -> None:
    """Set the fields of dataclass ``obj`` from ``raw``, recording every problem.

    Starts from ``obj``'s own defaults (not the class defaults) so that per-role defaults such as
    ``roles.llm.mode = lora`` survive a partial ``roles.llm`` section. A bad value keeps the
    default, which keeps later semantic checks from piling up follow-on errors.
    """
    cls = type(obj)
    hints = _hints(cls)
    valid = [f.name for f in _public_fields(cls)]
    for key in raw:
        if not isinstance(key, str) or key not in valid:
            problems.add(f"{prefix}{key}", _unknown_key_message(str(key), valid))
    for f in _public_fields(cls):
        if f.name not in raw:
            continue
        path = f"{prefix}{f.name}"
        value = raw[f.name]
        tp = hints[f.name]
        if is_dataclass(tp):
            if value is None:  # an empty section, e.g. `data:` with everything commented out
                continue
            if not isinstance(value, dict):
                problems.add(path, f"must be a mapping of settings, got {_describe(value)}")
                continue
            _fill(getattr(obj, f.name), value, f"{path}.", problems)
            continue
        if tp == str | list[DataSource]:
            out = _fill_sources(value, path, problems)
            if out is not _NO:
                setattr(obj, f.name, out)
            continue
        out = _coerce(value, tp)
        if out is _NO:
            problems.add(path, f"must be {_type_words(tp)}, got {_describe(value)}")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and out not in choices:
            allowed = ", ".join(repr(c) if c == "" else str(c) for c in choices)
            problems.add(path, f"invalid value {out!r}; allowed: {allowed}")
            continue
        setattr(obj, f.name, out)


def _fill_sources(value: Any, path: str, problems: _Problems) -> Any:
    """data.train: a path, one source mapping, or a list of paths and source mappings."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value, one = [value], True
    elif isinstance(value, list):
        one = False
    else:
        problems.add(path, f"must be a file path, a source mapping {{path: ...}} or a list of them, got "
                           f"{_describe(value)}")
        return _NO
    out = []
    for i, item in enumerate(value):
        where = path if one else f"{path}[{i}]"
        src = DataSource()
        if isinstance(item, str):
            src.path = item
        elif isinstance(item, dict):
            _fill(src, item, f"{where}.", problems)
        else:
            problems.add(where, f"must be a file path or a source mapping {{path: ..., weight: ...}}, got "
                                f"{_describe(item)}")
            continue
        src._index = i
        out.append(src)
    return out


def _check(recipe: Recipe, problems: _Problems, staged: bool = False) -> None:
    """Semantic checks that need more than one field's type (`staged`: the recipe has stages,
    whose own roles are checked with each stage)."""
    add = problems.add
    if not recipe.name:
        add("name", "must not be empty")
    elif "/" in recipe.name or "\\" in recipe.name:
        add("name", f"must not contain path separators (it names the run folder), got {recipe.name!r}")

    m = recipe.model
    if m.min_pixels < 1:
        add("model.min_pixels", f"must be >= 1, got {m.min_pixels}")
    if m.max_pixels < m.min_pixels:
        add("model.max_pixels", f"must be >= model.min_pixels ({m.min_pixels}), got {m.max_pixels}")
    if m.video_max_frames < 1:
        add("model.video_max_frames", f"must be >= 1, got {m.video_max_frames}")
    if m.video_fps <= 0:
        add("model.video_fps", f"must be > 0, got {m.video_fps}")
    from finetune.families import _registry  # the families are below the recipe at import time

    known = sorted(_registry())
    if m.family != "auto" and m.family not in known:
        close = difflib.get_close_matches(m.family, known, n=1)
        add("model.family", f"unknown family {m.family!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (known: auto, {', '.join(known)})")

    for role, cfg in recipe.roles.items():
        p = f"roles.{role}"
        if cfg.r < 1:
            add(f"{p}.r", f"must be >= 1, got {cfg.r}")
        if cfg.alpha < 1:
            add(f"{p}.alpha", f"must be >= 1, got {cfg.alpha}")
        if not 0 <= cfg.dropout < 1:
            add(f"{p}.dropout", f"must be in [0, 1), got {cfg.dropout}")
        if cfg.lr is not None and cfg.lr <= 0:
            add(f"{p}.lr", f"must be > 0 (or null to use train.lr), got {cfg.lr}")
        if isinstance(cfg.targets, str):
            if cfg.targets != "all-linear":
                add(
                    f"{p}.targets",
                    f"must be 'all-linear' or a list of module-name suffixes, got {cfg.targets!r}; "
                    f"write [{cfg.targets}] to adapt only that module",
                )
        elif not cfg.targets:
            add(f"{p}.targets", "must not be an empty list; use 'all-linear' or name at least one module")
        elif any(not t.strip() for t in cfg.targets):
            add(f"{p}.targets", "module-name suffixes must not be empty strings")
        for key in ("experts", "router"):
            if getattr(cfg, key) != "frozen" and (role != "llm" or cfg.mode != "lora"):
                add(f"{p}.{key}", f"is {getattr(cfg, key)!r}, but only roles.llm with mode lora has experts and "
                                  f"routers to train; set {p}.{key}: frozen" + (" or roles.llm.mode: lora"
                                                                                if role == "llm" else ""))

    roles = recipe.roles
    if roles.audio_head.mode != "frozen":
        add(
            "roles.audio_head.mode",
            f"must be frozen, got {roles.audio_head.mode!r}: this toolkit does not train speech output",
        )
    if m.quantize != "none" and roles.llm.mode == "full":
        path = problems.latest("model.quantize", "roles.llm.mode")
        add(
            path,
            f"cannot fully train a quantized LLM (model.quantize={m.quantize}, roles.llm.mode=full): "
            "quantized weights cannot be updated; use roles.llm.mode: lora (QLoRA) or model.quantize: none",
        )
    if all(cfg.mode == "frozen" for _, cfg in roles.items()) and not staged:
        add("roles", "every role is frozen, so nothing would be trained; set e.g. roles.llm.mode: lora")

    d = recipe.data
    if d.max_tokens < 64:
        add("data.max_tokens", f"must be >= 64, got {d.max_tokens}")
    if d.num_workers < -1:
        add("data.num_workers", f"must be >= 0, or -1 for auto, got {d.num_workers}")
    if d.cache_gb < 0:
        add("data.cache_gb", f"must be >= 0, got {d.cache_gb}")
    if d.max_line_bytes < 1024:
        add("data.max_line_bytes", f"must be >= 1024, got {d.max_line_bytes}")
    for key in ("max_text_chars", "max_image_pixels", "max_volume_voxels", "max_video_frames"):
        if getattr(d, key) < 1:
            add(f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    for key in ("max_audio_seconds", "max_video_seconds"):
        if not getattr(d, key) > 0:
            add(f"data.{key}", f"must be > 0, got {getattr(d, key)}")
    if d.demo and not d.sources():
        add("data.demo", "needs data.train: the demo dataset is written to data.train's path")
    if isinstance(d.train, list):
        if not d.train:
            add("data.train", "is an empty list; give at least one source")
        labels = [s.label for s in d.train]
        for i, src in enumerate(d.train):
            p = f"data.train[{src._index}]"
            if bool(src.path) == bool(src.hub):
                add(p, "needs exactly one of path (a file or folder) and hub (a dataset's hub id), got "
                       + ("both" if src.path else "neither"))
            if src.hub and src.format == "jsonl":
                add(f"{p}.format", "a hub dataset is read with `datasets`: use format: hf or auto")
            if src.weight <= 0:
                add(f"{p}.weight", f"must be > 0, got {src.weight}")
            if src.epochs is not None and src.epochs <= 0:
                add(f"{p}.epochs", f"must be > 0 (or null to use the weight), got {src.epochs}")
            if labels.count(src.label) > 1 and labels.index(src.label) == i:
                add(f"{p}.name", f"two sources are both named {src.label!r}; give each a distinct name")

    t = recipe.train
    if t.lr <= 0:
        add("train.lr", f"must be > 0, got {t.lr}")
    if t.router_aux_loss_coef is not None and t.router_aux_loss_coef < 0:
        add("train.router_aux_loss_coef", f"must be >= 0 (or null for the model's), got {t.router_aux_loss_coef}")
    if t.epochs <= 0 and t.max_steps <= 0:
        add("train.epochs", f"must be > 0 unless train.max_steps > 0, got {t.epochs}")
    if t.weight_decay < 0:
        add("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if not 0 <= t.warmup_ratio <= 1:
        add("train.warmup_ratio", f"must be in [0, 1], got {t.warmup_ratio}")
    if t.batch_size < 1:
        add("train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.grad_accum < 1:
        add("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.max_grad_norm < 0:
        add("train.max_grad_norm", f"must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    if t.logging_steps < 0:
        add("train.logging_steps", f"must be >= 0 (0 = auto), got {t.logging_steps}")
    if t.save_steps < 1:
        add("train.save_steps", f"must be >= 1, got {t.save_steps}")
    if t.save_total_limit < 1:
        add("train.save_total_limit", f"must be >= 1, got {t.save_total_limit}")
    if not t.resume.strip():
        add("train.resume", "must be 'auto', 'never' or a checkpoint path, got ''")
    ds = t.deepspeed.strip()
    if ds not in DEEPSPEED_PRESETS and not ds.endswith(".json"):
        add("train.deepspeed", f"must be one of {', '.join(DEEPSPEED_PRESETS)} or a path to a .json config, "
                               f"got {t.deepspeed!r}")
    if m.quantize == "8bit" and shards_weights(recipe):
        # bitsandbytes' int8 weights carry their scales in the parameter object, which the
        # engines' flat shards do not keep; 4-bit weights are stored in the compute dtype for them
        path = problems.latest("model.quantize", "train.distributed")
        add(path, f"model.quantize=8bit cannot be combined with sharded weights "
                  f"(train.distributed={t.distributed}{', ' + ds if t.distributed == 'deepspeed' else ''}); "
                  "use model.quantize: 4bit (QLoRA shards under ZeRO-3 and FSDP), or train.distributed: ddp, "
                  "or deepspeed with train.deepspeed: zero2")

    e = recipe.eval
    if e.max_new_tokens < 1:
        add("eval.max_new_tokens", f"must be >= 1, got {e.max_new_tokens}")
    if e.max_samples < 0:
        add("eval.max_samples", f"must be >= 0 (0 = all), got {e.max_samples}")
    if e.batch_size < 1:
        add("eval.batch_size", f"must be >= 1, got {e.batch_size}")
    if e.examples < 0:
        add("eval.examples", f"must be >= 0, got {e.examples}")
    if e.bootstrap < 0:
        add("eval.bootstrap", f"must be >= 0 (0 = no intervals), got {e.bootstrap}")

    x = recipe.export
    try:
        parse_size(x.max_shard_size)
    except ConfigError:
        add("export.max_shard_size", f"must be a size such as '2GB' or '500MB', got {x.max_shard_size!r}")
    if x.verify_atol < 0:
        add("export.verify_atol", f"must be >= 0, got {x.verify_atol}")


STAGE_KEYS = ("name", "roles", "data", "train")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def stage_settings(merged: dict, stage: dict) -> dict:
    """A stage's full settings: the recipe's, with the stage's data and train merged over them and
    its roles instead of the recipe's (a role the stage does not name is frozen in it)."""
    out = copy.deepcopy(merged)
    if "roles" in stage:
        out["roles"] = {r: {"mode": "frozen"} for r in ROLE_NAMES}
        _deep_merge(out["roles"], stage["roles"] or {})
    for key in ("data", "train"):
        if key in stage:
            out.setdefault(key, {})
            _deep_merge(out[key], stage[key] or {})
    return out


def _build_stages(stages: Any, merged: dict, problems: _Problems) -> list:
    """`stages:` checked and resolved: (name, settings as written, recipe) per stage (a problem's
    path `stages[i]...` names the layer that set `stages`)."""
    if not isinstance(stages, list) or not stages:
        problems.add("stages", f"must be a non-empty list of stages ({{name: ..., roles: ..., data: ..., train: ...}}), "
                               f"got {_describe(stages)}")
        return []
    out, names = [], []
    for i, stage in enumerate(stages):
        p = f"stages[{i}]"
        if not isinstance(stage, dict):
            problems.add(p, f"must be a mapping with name and any of roles, data, train; got {_describe(stage)}")
            continue
        bad = [k for k in stage if k not in STAGE_KEYS]
        for k in bad:
            problems.add(f"{p}.{k}", f"a stage sets only {', '.join(STAGE_KEYS)}" + (
                "; the model, eval, export and output settings are the recipe's, for every stage"
                if k in ("model", "eval", "export", "output") else f" ({_unknown_key_message(str(k), STAGE_KEYS)})"))
        name = stage.get("name")
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            problems.add(f"{p}.name", "needs a name of letters, digits, '-' and '_' (it names the stage's folder), "
                                      f"got {_describe(name)}")
            continue
        if name in names:
            problems.add(f"{p}.name", f"two stages are named {name!r}; give each its own name")
            continue
        names.append(name)
        stage_problems = _Problems(problems.layers, problems.fallback)
        rec = Recipe()
        _fill(rec, stage_settings(merged, {k: v for k, v in stage.items() if k not in bad}), "", stage_problems)
        _check(rec, stage_problems)
        for source, path, message in stage_problems.items:
            top = path.split(".")[0].split("[")[0]
            if top in stage:  # what the recipe itself sets is reported once, above
                problems.add(f"{p}.{path}", message, source)
        out.append((name, copy.deepcopy(stage), rec))
    return out


def _deep_merge(base: dict, over: dict) -> None:
    """Merge ``over`` into ``base`` in place: mappings merge, everything else replaces."""
    for key, value in over.items():
        current = base.get(key)
        if isinstance(current, dict):
            if isinstance(value, dict):
                _deep_merge(current, value)
                continue
            if value is None:  # an emptied-out section keeps what the parent had
                continue
        base[key] = copy.deepcopy(value)


def _resolve_layers(layers: Sequence[_Layer], name: str, extra: Sequence[tuple[str, str, str]] = ()) -> Recipe:
    """Merge the layers, build and check the recipe; raise one RecipeError listing every problem."""
    merged: dict = {}
    for _, data in layers:
        _deep_merge(merged, data)
    files = [label for label, _ in layers if label != OVERRIDE_SOURCE]
    problems = _Problems(layers, fallback=files[-1] if files else OVERRIDE_SOURCE)
    for source, path, message in extra:
        problems.add(path, message, source)
    stages = merged.pop("stages", None)
    recipe = Recipe()
    _fill(recipe, merged, "", problems)
    _check(recipe, problems, staged=stages is not None)
    if stages is not None:
        recipe._stages = _build_stages(stages, merged, problems)
    if problems.items:
        raise _format_error(name, problems.lines())
    sources = {}
    for path in _leaf_paths():
        i = _layer_index(layers, path)
        if i < 0:
            sources[path] = DEFAULT_SOURCE
        elif layers[i][0] == OVERRIDE_SOURCE:
            sources[path] = OVERRIDE_SOURCE
        else:
            sources[path] = f"recipe:{layers[i][0]}"
    recipe._sources = sources
    return recipe


# ----------------------------------------------------------------------------------------------
# Files, extends and overrides
# ----------------------------------------------------------------------------------------------


def _default_recipes_dir() -> Path:
    local = Path.cwd() / "recipes"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes(recipes_dir: Path | None = None) -> list[str]:
    """Names (file stems) of the YAML recipes in ``recipes_dir``, sorted."""
    folder = Path(recipes_dir) if recipes_dir is not None else _default_recipes_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")})


def _looks_like_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


def _find_recipe_file(path_or_name: str | Path, recipes_dir: Path) -> Path:
    text = str(path_or_name)
    candidates: list[Path] = []
    if isinstance(path_or_name, str) and _looks_like_name(text):
        candidates += [recipes_dir / f"{text}.yaml", recipes_dir / f"{text}.yml", Path(text)]
    else:
        candidates.append(Path(text))
        # `medical-tiny.yaml` typed from another folder still means the bundled recipe.
        if len(Path(text).parts) == 1:
            candidates.append(recipes_dir / text)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = list_recipes(recipes_dir)
    hint = f"; available recipes in {recipes_dir}: {', '.join(available)}" if available else f"; no recipes in {recipes_dir}"
    close = difflib.get_close_matches(Path(text).stem, available, n=1)
    if close:
        hint = f"; did you mean '{close[0]}'?" + hint
    raise RecipeError(f"recipe {text!r} not found (looked for {', '.join(map(str, candidates))}){hint}")


def _find_parent(ref: str, child: Path, recipes_dir: Path) -> Path | None:
    base = child.parent / ref
    candidates = [base]
    if not base.suffix:
        candidates += [base.with_name(base.name + ".yaml"), base.with_name(base.name + ".yml")]
    if _looks_like_name(ref):
        # A bare name may also refer to a bundled recipe when the child lives elsewhere.
        candidates += [recipes_dir / f"{ref}.yaml", recipes_dir / f"{ref}.yml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _is_resolved(data: Any) -> bool:
    """True for what :func:`save_resolved` writes (a run's recipe.yaml): ``recipe:`` and ``sources:``."""
    return isinstance(data, dict) and isinstance(data.get("recipe"), dict) and set(data) <= {"recipe", "sources"}


def _read_layers(path: Path, recipes_dir: Path, top_name: str, chain: list[Path],
                 saved: dict[str, dict] | None = None) -> list[_Layer]:
    """The layers of ``path`` and its ``extends`` ancestors, ancestors first. A resolved recipe
    (a run's recipe.yaml) is one layer, its body; its ``sources:`` go into ``saved`` by label."""
    label = path.name

    def fail(message: str, where: str = "(file)") -> RecipeError:
        return _format_error(top_name, [f"{label}: {where}: {message}"])

    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(p.name for p in [*chain[chain.index(resolved):], resolved])
        # Attribute the cycle to the file whose `extends` closed it.
        raise _format_error(top_name, [f"{chain[-1].name}: extends: extends cycle: {names}"])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read file: {exc}") from exc
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise fail(f"invalid YAML: {_yaml_error_text(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail(f"top level must be a mapping of settings, got {_describe(data)}")
    if _is_resolved(data):  # complete by itself: no extends
        if saved is not None and isinstance(data.get("sources"), dict):
            saved[label] = data["sources"]
        return [(label, dict(data["recipe"]))]
    data = dict(data)
    ref = data.pop("extends", None)
    layers: list[_Layer] = []
    if ref is not None:
        if not isinstance(ref, str) or not ref.strip():
            raise fail(f"must be a recipe name or relative path, got {_describe(ref)}", "extends")
        parent = _find_parent(ref.strip(), path, recipes_dir)
        if parent is None:
            raise fail(f"parent recipe {ref!r} not found next to {path.name} or in {recipes_dir}", "extends")
        layers = _read_layers(parent, recipes_dir, top_name, [*chain, resolved], saved)
    layers.append((label, data))
    return layers


def _override_layer(text: str) -> tuple[dict | None, str | None]:
    """Parse ``a.b=value`` into a nested dict; on failure return (None, problem)."""
    if "=" not in text:
        return None, "override must look like key.path=value (no '=' found)"
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        return None, f"override key {key!r} is not a dotted path such as train.lr"
    parts = [p.strip() for p in parts]
    tp = _leaf_type(parts)
    plain_str = tp is str
    try:
        value = _parse_yaml(raw)
    except yaml.YAMLError as exc:
        if tp is not None and _coerce("", tp) is not _NO:
            value = raw.strip()  # text that YAML chokes on is still a fine string value
        else:
            return None, f"cannot parse value {raw.strip()!r}: {_yaml_error_text(exc)}"
    else:
        if plain_str and raw.strip() == "":
            value = ""
        elif (
            tp is not None
            and _coerce("", tp) is not _NO
            and value is not None
            and not isinstance(value, (str, list))
        ):
            # `model.path=123` or `data.system_prompt=Answer: briefly` meant the literal text.
            value = raw.strip()
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested, None


def load_recipe(
    path_or_name: str | Path,
    overrides: Sequence[str] = (),
    recipes_dir: Path | None = None,
) -> Recipe:
    """Load, merge (``extends``), override and validate a recipe.

    ``path_or_name`` is a YAML path or a bare name looked up in ``recipes_dir`` (default:
    ``./recipes`` if it exists, else the ``recipes/`` folder shipped next to the package).
    ``overrides`` are ``dotted.path=value`` strings whose values are parsed as YAML. A file
    written by :func:`save_resolved` (a run's ``recipe.yaml``) is a recipe too, keeping where
    each of its values came from.
    Raises :class:`RecipeError` listing every problem at once.
    """
    folder = Path(recipes_dir) if recipes_dir is not None else _default_recipes_dir()
    path = _find_recipe_file(path_or_name, folder)
    top_name = path.stem
    saved: dict[str, dict] = {}
    layers = _read_layers(path, folder, top_name, [], saved)
    # The name comes from the file that was asked for, never from a parent, so that a child
    # recipe gets its own run folder.
    top_label, top_data = layers[-1]
    if "name" not in top_data:
        layers[-1] = (top_label, {"name": top_name, **top_data})

    extra: list[tuple[str, str, str]] = []
    for text in overrides:
        nested, problem = _override_layer(str(text))
        if problem is not None:
            extra.append((OVERRIDE_SOURCE, str(text).partition("=")[0].strip() or str(text), problem))
        else:
            layers.append((OVERRIDE_SOURCE, nested))

    header = top_name
    name_index = _layer_index(layers, "name")
    if name_index >= 0 and isinstance(layers[name_index][1].get("name"), str) and layers[name_index][1]["name"]:
        header = layers[name_index][1]["name"]
    recipe = _resolve_layers(layers, header, extra)
    for label, sources in saved.items():
        for key, source in recipe._sources.items():
            if source == f"recipe:{label}" and isinstance(sources.get(key), str):
                recipe._sources[key] = sources[key]
    return recipe


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a nested plain dict (private fields left out)."""

    def convert(obj: Any) -> Any:
        if is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in _public_fields(type(obj))}
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        return copy.deepcopy(obj)

    return convert(recipe)


def recipe_provenance(recipe: Recipe) -> dict[str, str]:
    """Where each leaf setting came from: ``default``, ``recipe:<file name>`` or ``override``.

    A recipe built in code (not by :func:`load_recipe`) reports every setting as ``default``.
    """
    sources = getattr(recipe, "_sources", {}) or {}
    return {path: sources.get(path, DEFAULT_SOURCE) for path in _leaf_paths()}


def save_resolved(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (``recipe:``) and each setting's origin (``sources:``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = recipe_to_dict(recipe)
    if recipe.stages:
        body["stages"] = [stage for _, stage, _ in recipe.stages]
    body = yaml.safe_dump(
        {"recipe": body, "sources": recipe_provenance(recipe)},
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
    )
    header = (
        f"# Resolved recipe '{recipe.name}'. Re-create the run with finetune.recipe.load_resolved().\n"
        "# sources: default | recipe:<file that set it> | override\n"
    )
    fsutil.atomic_write_text(path, header + body)


def file_name(path: str) -> str:
    """A data location as shared files name it: its last part (file or folder name), never the
    folders above it ('' stays '')."""
    parts = re.split(r"[\\/]+", str(path or "").rstrip("\\/"))
    return parts[-1] if parts else ""


def model_name(path: str) -> str:
    """model.path as shared files name it: `tiny:<family>` and a hub id (org/name) as they are, a
    local folder by its folder name."""
    text = str(path or "")
    if text.startswith("tiny:") or (is_hub_id(text) and not Path(text).exists()):
        return text
    return file_name(text)


def _scrub(body: dict) -> None:
    """Reduce one recipe (or stage) mapping to what may be shared, in place: paths to names, no
    output folder, no system prompt text."""
    model = body.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = model_name(model["path"])
    data = body.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("train"), str):
            data["train"] = file_name(data["train"])
        elif isinstance(data.get("train"), list):
            for src in data["train"]:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    src["path"] = file_name(src["path"])
        if isinstance(data.get("eval"), str):
            data["eval"] = file_name(data["eval"])
        if data.get("system_prompt"):
            del data["system_prompt"]
    ev = body.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("general"), str):
        ev["general"] = file_name(ev["general"])
    train = body.get("train")
    if isinstance(train, dict):
        if isinstance(train.get("resume"), str) and train["resume"] not in ("auto", "never"):
            train["resume"] = file_name(train["resume"])
        if isinstance(train.get("deepspeed"), str) and re.search(r"[\\/]|\.json$", train["deepspeed"]):
            train["deepspeed"] = file_name(train["deepspeed"])
    out = body.get("output")
    if isinstance(out, dict):
        out.pop("dir", None)
        if not out:
            del body["output"]


def shareable_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as an export carries it when `export.include_data_details` is false:
    data files, eval.general and a local model.path named by their last part, no output folder,
    no system prompt text (the run folder's recipe.yaml keeps all of it)."""
    body = recipe_to_dict(recipe)
    if recipe.stages:
        body["stages"] = copy.deepcopy([stage for _, stage, _ in recipe.stages])
    _scrub(body)
    for stage in body.get("stages", []):
        if isinstance(stage, dict):
            _scrub(stage)
    return body


def save_shareable(recipe: Recipe, path: Path) -> None:
    """Write :func:`shareable_recipe` (with each setting's origin) as YAML, saying what was left out."""
    left_out = "data files by name only, no output folder"
    if recipe.data.system_prompt:
        left_out += ", the system prompt's text left out (one was used)"
    sources = {k: (f"recipe:{file_name(v[7:])}" if v.startswith("recipe:") else v)
               for k, v in recipe_provenance(recipe).items()}
    body = yaml.safe_dump({"recipe": shareable_recipe(recipe), "sources": sources}, sort_keys=False,
                          allow_unicode=True, default_flow_style=False)
    header = (f"# Recipe '{recipe.name}' as shared with this export: {left_out}.\n"
              "# The run folder's recipe.yaml holds the full resolved recipe (export.include_data_details: true "
              "copies that one here).\n")
    Path(path).write_text(header + body, encoding="utf-8")


def load_resolved(path: Path) -> Recipe:
    """Read a file written by :func:`save_resolved` back into a validated :class:`Recipe`.

    The values come from ``recipe:``; ``sources:`` is not used as settings, but it restores the
    original provenance so a re-saved run keeps recording where its values came from.
    """
    path = Path(path)
    label = path.name
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read resolved recipe {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise _format_error(path.stem, [f"{label}: (file): invalid YAML: {_yaml_error_text(exc)}"]) from exc
    if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict):
        raise _format_error(path.stem, [f"{label}: recipe: not a resolved recipe file (no top-level 'recipe:' mapping)"])
    body = data["recipe"]
    name = body.get("name") if isinstance(body.get("name"), str) and body.get("name") else path.stem
    recipe = _resolve_layers([(label, body)], name)
    saved = data.get("sources")
    if isinstance(saved, dict):
        for key, value in saved.items():
            if key in recipe._sources and isinstance(value, str):
                recipe._sources[key] = value
    return recipe


# ----------------------------------------------------------------------------------------------
# An existing run: evaluation and export settings change, what was trained does not
# ----------------------------------------------------------------------------------------------

#: what `eval` and `export` may change on a trained run: how it is evaluated and exported, on
#: which held-out data, and how bad samples of that data are handled. Everything else (model,
#: roles, data.train, the prompt, the pixels, train.*, stages) made the adapter, and stays the
#: run's own (its recipe.yaml).
RUN_SETTINGS: tuple[str, ...] = ("description", "data.eval", "data.on_error", "data.allow_outside_paths", "eval.*",
                                 "export.*")
#: what locates a run folder rather than describing the run
_LOCATORS = ("name", "output.dir")


def run_may_change(path: str) -> bool:
    """True for a dotted setting in :data:`RUN_SETTINGS` (``eval.*`` covers ``eval.max_samples``)."""
    return any(path == p or (p.endswith(".*") and path.startswith(p[:-1])) for p in RUN_SETTINGS)


class RunRecipe(typing.NamedTuple):
    """What :func:`load_run` returns: the recipe to evaluate or export with, the run folder, and
    one line per setting the recipe now gives otherwise than the run was trained with (the run's
    value is kept)."""

    recipe: Recipe
    run_dir: Path
    notes: list[str]


def run_folder_of(target: str | Path) -> Path | None:
    """The run folder ``target`` names: a folder with a recipe.yaml, or a run's own recipe.yaml
    (or stages.yaml) inside one; None for anything else (a recipe name or file)."""
    p = Path(target)
    if p.is_dir():
        return p if (p / "recipe.yaml").is_file() else None
    if p.name in ("recipe.yaml", "stages.yaml") and p.is_file() and (p.parent / "recipe.yaml").is_file():
        try:
            return p.parent if _is_resolved(_parse_yaml(p.read_text(encoding="utf-8"))) else None
        except (OSError, yaml.YAMLError):
            return None
    return None


def trained_recipe_file(run_dir: Path) -> Path:
    """The file of the recipe a run folder was trained with: a staged run's stages.yaml (every
    stage), else its recipe.yaml."""
    staged = Path(run_dir) / "stages.yaml"
    return staged if staged.is_file() else Path(run_dir) / "recipe.yaml"


def _settings(recipe: Recipe) -> dict[str, Any]:
    """Every leaf setting by dotted path, and `stages` as written."""
    body = recipe_to_dict(recipe)
    flat: dict[str, Any] = {}
    for path in _leaf_paths():
        value: Any = body
        for part in path.split("."):
            value = value[part]
        flat[path] = value
    flat["stages"] = [stage for _, stage, _ in recipe.stages]
    return flat


def _set(body: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        body = body.setdefault(part, {})
    body[leaf] = copy.deepcopy(value)


def load_run(target: str | Path, overrides: Sequence[str] = (), recipes_dir: Path | None = None) -> RunRecipe:
    """The recipe of an existing run for `eval` and `export`, with ``overrides`` applied.

    ``target`` is a run folder (or its recipe.yaml): its recipe.yaml with the overrides on top.
    Or a recipe (name or file) with the overrides, which locates the run folder (``output.dir``,
    else runs/<name>): when that folder holds a trained run, the run's recipe with the recipe's
    :data:`RUN_SETTINGS`; a setting of what was trained that the recipe file now gives otherwise
    keeps the run's value, with a note. An override that changes what was trained is refused,
    every one named, in one :class:`RecipeError`. Without a run folder: the recipe as it is.
    """
    folder = run_folder_of(target)
    if folder is not None:
        path = trained_recipe_file(folder)
        recipe = load_recipe(path, overrides, recipes_dir)
        saved = load_resolved(path)
        given, had = _settings(recipe), _settings(saved)
        changed = [k for k in given if given[k] != had[k]]
        refused = [k for k in changed if not run_may_change(k)]
        if refused:
            raise _refuse(folder, refused, had, given, recipe_provenance(recipe))
        if recipe.stages and Path(recipe.run_dir).resolve() != folder.resolve():
            # a staged run moved since (or a relative output.dir): its stages are found from output.dir; an
            # unstaged one keeps the recipe it was trained with (its exports carry it) and is given run_dir
            recipe.output.dir = str(folder)
        return RunRecipe(recipe, folder, [])

    recipe = load_recipe(target, overrides, recipes_dir)
    run_dir = recipe.run_dir
    if not (run_dir / "recipe.yaml").is_file():
        return RunRecipe(recipe, run_dir, [])
    path = trained_recipe_file(run_dir)
    saved = load_resolved(path)
    given, had = _settings(recipe), _settings(saved)
    sources = recipe_provenance(recipe)
    changed = [k for k in given if given[k] != had[k] and k not in _LOCATORS]
    refused = [k for k in changed if not run_may_change(k) and sources.get(k, OVERRIDE_SOURCE) == OVERRIDE_SOURCE]
    if refused:
        raise _refuse(run_dir, refused, had, given, sources)
    body = recipe_to_dict(saved)
    if saved.stages:
        body["stages"] = had["stages"]
    notes, taken = [], []
    for k in changed:
        if run_may_change(k):
            _set(body, k, given[k])
            taken.append(k)
        else:
            notes.append(f"{run_dir} was trained with {k}={had[k]!r}; the recipe now gives {given[k]!r} "
                         f"({sources.get(k, DEFAULT_SOURCE)}): the run keeps what it was trained with")
    if saved.stages and Path(saved.run_dir).resolve() != Path(run_dir).resolve():
        body["output"]["dir"] = str(run_dir)
    out = _resolve_layers([(path.name, body)], saved.name)
    out._sources = {**recipe_provenance(saved), **{k: sources[k] for k in taken if k in sources}}
    return RunRecipe(out, run_dir, notes)


def _refuse(run_dir: Path, keys: list[str], had: dict, given: dict, sources: dict) -> RecipeError:
    lines = []
    for k in keys:
        if k in _LOCATORS:
            lines.append(f"{k}: {given[k]!r} names another run than {run_dir}; give that run folder, or the recipe")
        else:
            lines.append(f"{k}: the run was trained with {had[k]!r}; this command gives {given[k]!r} "
                         f"({sources.get(k, OVERRIDE_SOURCE)})")
    return RecipeError(
        f"{run_dir} is a trained run: eval and export change only {', '.join(RUN_SETTINGS)} on it, and this command "
        f"changes what was trained:\n" + "\n".join(f"  {ln}" for ln in lines) +
        "\nFix: drop these settings (the run's recipe.yaml keeps what it was trained with), or train a new run with "
        "them (another output.dir)", lines)
