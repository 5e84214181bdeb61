"""The recipe's schema: nested dataclasses whose fields carry each setting's default, help, allowed
values and bounds.

A field is declared with :func:`_opt`: its default, a help string, and where the value is
restricted, its ``choices``, its bounds (``ge``, ``gt``, ``le``, ``lt``, with ``why`` saying what a
special value means) or a ``check`` that names what is wrong with a value. The loader
(:mod:`finetune.recipe.check`) reads them from the metadata and reports every violation with its
dotted path; only rules that tie several fields together are written out by hand there.
"""

from __future__ import annotations

import copy
import difflib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from finetune import families
from finetune.checkpoint import parse_size
from finetune.data.schema import Limits
from finetune.deepspeed_presets import DEEPSPEED_PRESETS, deepspeed_stage
from finetune.errors import ConfigError, UserError
from finetune.families.base import ROLE_NAMES

_DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTRIBUTED = ("auto", "ddp", "fsdp", "deepspeed")
#: data.long_audio: what happens to a clip longer than the model's processor reads (Family.max_audio_samples)
LONG_AUDIO = ("error", "split", "truncate")
#: the bound keywords of :func:`_opt`, as the checker reads them from a field's metadata
BOUNDS = ("ge", "gt", "le", "lt")


def _opt(default: Any, help: str, choices: Sequence[Any] | None = None, *, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None, why: str = "",
         check: Callable[[Any], str | None] | None = None) -> Any:
    """A scalar field with its help string and what it allows: enumerated ``choices``, bounds
    (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <; ``why`` is said with a violation, e.g. "0 = auto"),
    or a ``check`` giving the problem of a value (None when it is fine). null passes the bounds and
    the check: a field that takes null says what it means in its help."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for key, bound in zip(BOUNDS, (ge, gt, le, lt)):
        if bound is not None:
            meta[key] = bound
    if why:
        meta["why"] = why
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(factory: Any, help: str) -> Any:
    """A nested-section field with its help string."""
    return field(default_factory=factory, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Checks of one field's value that are not bounds or choices (None = fine)
# ----------------------------------------------------------------------------------------------


def _name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if "/" in name or "\\" in name:
        return f"must not contain path separators (it names the run folder), got {name!r}"
    return None


def _family_problem(family: str) -> str | None:
    known = families.names()
    if family == "auto" or family in known:
        return None
    close = difflib.get_close_matches(family, known, n=1)
    return (f"unknown family {family!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (known: auto, {', '.join(known)})")


def _targets_problem(targets: str | list[str]) -> str | None:
    if isinstance(targets, str):
        if targets != "all-linear":
            return (f"must be 'all-linear' or a list of module-name suffixes, got {targets!r}; "
                    f"write [{targets}] to adapt only that module")
    elif not targets:
        return "must not be an empty list; use 'all-linear' or name at least one module"
    elif any(not t.strip() for t in targets):
        return "module-name suffixes must not be empty strings"
    return None


def _sources_problem(train: str | list) -> str | None:
    return "is an empty list; give at least one source" if isinstance(train, list) and not train else None


def _resume_problem(resume: str) -> str | None:
    return None if resume.strip() else "must be 'auto', 'never' or a checkpoint path, got ''"


def _deepspeed_problem(setting: str) -> str | None:
    ds = setting.strip()
    if ds in DEEPSPEED_PRESETS or ds.endswith(".json"):
        return None
    return f"must be one of {', '.join(DEEPSPEED_PRESETS)} or a path to a .json config, got {setting!r}"


def _size_problem(size: str) -> str | None:
    try:
        parse_size(size)  # the export's own reader: what passes here, the export takes
    except ConfigError:
        return f"must be a size such as '2GB' or '500MB', got {size!r}"
    return None


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
                               "the config", check=_family_problem)
    dtype: str = _opt("auto", "dtype the weights are loaded in", _DTYPES)
    quantize: str = _opt("none", "load the LLM quantized with bitsandbytes (QLoRA)", ("none", "4bit", "8bit"))
    attn: str = _opt(
        "auto",
        "attention implementation",
        ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"),
    )
    min_pixels: int = _opt(3136, "minimum pixels per image after resizing (56*56)", ge=1)
    max_pixels: int = _opt(401408, "maximum pixels per image after resizing (512*28*28)")
    video_max_frames: int = _opt(16, "maximum number of frames sampled from one video", ge=1)
    video_fps: float = _opt(2.0, "frames per second sampled from videos", gt=0)
    use_audio_in_video: bool = _opt(
        False, "read a video file's own sound track with its frames, interleaved by time, as the model's processor "
               "does with use_audio_in_video (Qwen2.5-Omni, Qwen3-Omni; a video part's own \"use_audio_in_video\" "
               "overrides it); true for a model whose processor has no such setting is an error")
    tiny_seed: int = _opt(0, "seed used when building a random tiny model")


@dataclass
class RoleConfig:
    """How one component (role) of the model is trained."""

    mode: str = _opt("frozen", "frozen: not trained; lora: LoRA adapters; full: all weights trained", ("frozen", "lora", "full"))
    r: int = _opt(16, "LoRA rank", ge=1)
    alpha: int = _opt(32, "LoRA alpha (scaling = alpha / r)", ge=1)
    dropout: float = _opt(0.05, "dropout applied to the LoRA input", ge=0, lt=1)
    targets: str | list[str] = _opt("all-linear", "'all-linear' or a list of module-name suffixes to adapt",
                                    check=_targets_problem)
    lr: float | None = _opt(None, "learning rate for this role; null = train.lr", gt=0, why="or null to use train.lr")
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
                              "weights (3 and 1 = 75% and 25%)", gt=0)
    epochs: float | None = _opt(None, "mixtures: instead of a weight, how many times this source's tokens go into "
                                      "each epoch (0.25 = a seeded quarter of it); null = by weight",
                                gt=0, why="or null to use the weight")
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
            "{path|hub, format, split, revision, columns}, or a list of sources with weight or epochs (a mixture)",
        check=_sources_problem)
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
    max_tokens: int = _opt(4096, "token budget of one sample / one packed row", ge=64)
    on_error: str = _opt("raise", "what to do with a broken sample", ("raise", "skip"))
    long_audio: str = _opt(
        "error", "an audio clip longer than the model's processor reads (Qwen2.5-Omni 300 s, Gemma 3n 30 s): error = "
                 "a located error naming it; split = consecutive clips of at most that length, each its own audio "
                 "item; truncate = its first part, as the processor cuts it at inference (counted and reported)",
        LONG_AUDIO)
    allow_outside_paths: bool = _opt(False, "allow media paths outside the dataset's folder")
    packing: bool = _opt(True, "pack several samples into one row of max_tokens (isolated attention; train.batch_size then counts rows)")
    num_workers: int = _opt(-1, "data-loader worker processes; -1 = auto: 4 on CUDA (decoding and encoding overlap "
                                "the GPU's step), 0 on the CPU (workers would take the step's own cores)",
                            ge=-1, why="-1 = auto")
    cache_gb: float = _opt(2.0, "GB of encoded samples (pixels, audio features, positions) kept in memory from one "
                                "epoch to the next, split across workers; 0 = encode on every use", ge=0)
    # Caps on one input, checked before it is parsed, tokenised or decoded (sizes from file headers): a
    # small file that claims or expands to gigabytes is a located error, not a crash. Defaults: Limits.
    max_line_bytes: int = _opt(Limits.max_line_bytes, "longest JSONL line in bytes, refused before JSON parsing "
                                                      "(media belong in files named by 'path', not inline)",
                                ge=1024)
    max_text_chars: int = _opt(Limits.max_text_chars, "most characters of text in one sample, refused before "
                                                      "tokenising (1,000,000 is about 250k tokens)", ge=1)
    max_image_pixels: int = _opt(Limits.max_image_pixels, "most pixels of one image (DICOM, NIfTI slice, video frame) "
                                                          "from its header, before decoding; 67,108,864 = 8192 x 8192, "
                                                          "far above model.max_pixels (images are resized to that)",
                                  ge=1)
    max_volume_voxels: int = _opt(Limits.max_volume_voxels, "most voxels of a NIfTI volume or multi-frame DICOM "
                                                            "from its header (536,870,912 = 512 x 512 x 2048)",
                                   ge=1)
    max_audio_seconds: float = _opt(Limits.max_audio_seconds, "longest recording in seconds, from its header (at up "
                                                              "to 48 kHz: a 192 kHz file may be a quarter as long)",
                                     gt=0)
    max_video_seconds: float = _opt(Limits.max_video_seconds, "longest video file in seconds, from its header",
                                     gt=0)
    max_video_frames: int = _opt(Limits.max_video_frames, "most frames of one video (file, folder or list), counted "
                                                          "before decoding; 108,000 = an hour at 30 fps", ge=1)

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
    method: str = _opt("sft", "sft: learn the answers (chat data); dpo: prefer each pair's chosen answer to its "
                              "rejected one (preference data), against the model with its LoRA adapters disabled; "
                              "grpo: sample train.grpo_group answers to each prompt and reinforce those the "
                              "evaluation's metric scores above their group's mean (closed questions with a checkable "
                              "answer)",
                       ("sft", "dpo", "grpo"))
    dpo_beta: float = _opt(0.1, "train.method dpo: how far the model may move from the reference (the weight of "
                                "the log-ratios; larger = closer to the reference)", gt=0)
    dpo_loss: str = _opt("sigmoid", "train.method dpo: sigmoid (DPO) or ipo (IPO, the log-ratios averaged per "
                                    "completion token)", ("sigmoid", "ipo"))
    grpo_group: int = _opt(4, "train.method grpo: answers sampled per prompt (G); each is rewarded against its "
                              "group's mean and spread", ge=2, le=64)
    grpo_beta: float = _opt(0.04, "train.method grpo: weight of the KL penalty to the reference (the model with its "
                                  "LoRA adapters disabled); 0 = none", ge=0)
    grpo_epsilon: float = _opt(0.2, "train.method grpo: the policy ratio's clip range", gt=0, lt=1)
    grpo_temperature: float = _opt(1.0, "train.method grpo: sampling temperature of the answers", gt=0, le=4)
    grpo_max_new_tokens: int = _opt(16, "train.method grpo: longest sampled answer in tokens", ge=1, le=4096)
    grpo_format_reward: float = _opt(0.0, "train.method grpo: added to the reward of an answer the metric can "
                                          "read (yes/no first for yesno, an option for choice, a non-empty answer "
                                          "otherwise)",
                                     ge=0, le=1)
    epochs: float = _opt(1.0, "number of passes over the training data")
    max_steps: int = _opt(-1, "stop after this many optimizer steps; -1 = use epochs")
    lr: float = _opt(2e-4, "peak learning rate", gt=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = _opt(0.03, "fraction of steps used for learning-rate warmup", ge=0, le=1)
    scheduler: str = _opt("cosine", "learning-rate schedule", ("cosine", "linear", "constant", "constant_with_warmup"))
    batch_size: int = _opt(1, "rows per device per step", ge=1)
    grad_accum: int = _opt(8, "gradient accumulation steps", ge=1)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 = no clipping", ge=0, why="0 = no clipping")
    precision: str = _opt("auto", "mixed-precision mode", ("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward to save memory")
    optim: str = _opt("auto", "optimizer; auto = adamw_torch_fused on CUDA (one fused kernel for all parameters), "
                              "adamw_torch elsewhere", ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit",
                                                        "adamw_8bit"))
    router_aux_loss_coef: float | None = _opt(
        None, "mixture-of-experts LLMs: weight of the load-balancing loss, added to the loss when the experts or "
              "routers train (roles.llm.experts / router) and logged every step either way; null = the model "
              "config's router_aux_loss_coef", ge=0, why="or null for the model's")
    token_metrics: bool = _opt(False, "log TRL's entropy and next-token accuracy every step (softmax work over the "
                                      "vocabulary and a device read each step); the loss is the same either way")
    logging_steps: int = _opt(0, "log every N optimizer steps (metrics.jsonl, TensorBoard); 0 = auto: every step on "
                                 "the CPU, every 10 on a GPU (a logged step reads the loss and gradient norm back "
                                 "from the device, which makes the host wait for it)", ge=0, why="0 = auto")
    print_every: int = _opt(0, "print a summary line every N optimizer steps; 0 = about 20 lines a run")
    save_steps: int = _opt(50, "save a checkpoint every N optimizer steps", ge=1)
    save_total_limit: int = _opt(2, "number of checkpoints kept", ge=1)
    resume: str = _opt("auto", "'auto' (latest checkpoint in the run folder), 'never', or a checkpoint path",
                       check=_resume_problem)
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
        check=_deepspeed_problem,
    )


@dataclass
class EvalConfig:
    """Evaluation on the held-out split."""

    max_new_tokens: int = _opt(32, "tokens generated per evaluation sample", ge=1)
    max_samples: int = _opt(0, "evaluate at most this many samples; 0 = all", ge=0, why="0 = all")
    batch_size: int = _opt(8, "samples generated at once", ge=1)
    compare_base: bool = _opt(True, "also evaluate the base model for comparison")
    examples: int = _opt(5, "number of example generations shown in the report", ge=0)
    metric: str = _opt(
        "auto",
        "how an answer is scored (a sample's own \"metric\" key wins): exact, normalised exact match; yesno, the "
        "leading yes/no word; choice, the option picked from the sample's \"options\"; open, token F1 (and ROUGE-L); "
        "auto = choice for a sample with options, yesno when the reference is yes or no, else exact",
        ("auto", "exact", "choice", "yesno", "open"),
    )
    bootstrap: int = _opt(1000, "bootstrap resamples for the 95% intervals (0 = no intervals)", ge=0,
                           why="0 = no intervals")
    general: str = _opt("", "held-out general JSONL set scored before and after tuning (the forgetting "
                            "check); '' = none")
    report: bool = _opt(True, "also write eval.html: metrics, loss curve, examples with media, filters")
    report_media: bool = _opt(True, "eval.html shows the examples' images and audio inline; false = the media are "
                                    "left out (the page still holds questions and answers)")
    groups: dict[str, list[str]] = _opt({}, "named groups of tasks whose exact-match accuracy is reported as "
                                             "<name>_accuracy beside the figures (the demo recipes: lesion = its "
                                             "lesion and audio questions); {} = none")


@dataclass
class ExportConfig:
    """How the fine-tuned model is exported."""

    format: str = _opt("merged", "merged: adapters merged into the weights; adapter: adapters only", ("merged", "adapter", "both"))
    dtype: str = _opt("auto", "dtype of the exported weights", _DTYPES)
    max_shard_size: str = _opt("2GB", "largest safetensors shard, e.g. '2GB' or '500MB'", check=_size_problem)
    quantize: str = _opt(
        "none",
        "also write merged-<4bit|8bit>/: the merged model quantised with bitsandbytes (NF4 / int8), checked to load",
        ("none", "4bit", "8bit"),
    )
    verify_atol: float = _opt(
        1e-4,
        "max abs logit difference accepted between merged and adapter model (the bf16 rule lives in the exporter)",
        ge=0,
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

    name: str = _opt("", "recipe name; set from the YAML file stem when loaded", check=_name_problem)
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


def shards_weights(recipe: Recipe) -> bool:
    """True when the strategy shards the parameters themselves (ZeRO-3, FSDP), not only the
    optimizer state and gradients (ZeRO-1/2) or nothing (DDP)."""
    t = recipe.train
    return t.distributed == "fsdp" or (t.distributed == "deepspeed" and deepspeed_stage(t.deepspeed) == 3)


# ----------------------------------------------------------------------------------------------
# Schema introspection
# ----------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass ``cls``, by field name."""
    # `from __future__ import annotations` turns annotations into strings; resolve them once.
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def public_fields(cls: type) -> list[Any]:
    """The settings of dataclass ``cls`` (its private bookkeeping fields left out)."""
    return [f for f in fields(cls) if not f.name.startswith("_")]


def walk_schema(cls: type, prefix: str = ""):
    """Yield (dotted path, dataclass field, type) for every leaf of the schema."""
    hints = type_hints(cls)
    for f in public_fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from walk_schema(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def leaf_paths() -> list[str]:
    """The dotted path of every leaf setting, in schema order."""
    return [p for p, _, _ in walk_schema(Recipe)]


def leaf_type(parts: Sequence[str]) -> Any:
    """Annotation of the schema leaf at ``parts``, or None if it is not a leaf."""
    cls: Any = Recipe
    for part in parts:
        if not is_dataclass(cls):
            return None
        hints = type_hints(cls)
        if part not in hints or part.startswith("_"):
            return None
        cls = hints[part]
    return None if is_dataclass(cls) else cls


CHOICES: dict[str, tuple[Any, ...]] = {
    path: f.metadata["choices"] for path, f, _ in walk_schema(Recipe) if "choices" in f.metadata
}
"""Allowed values of every enumerated field, by dotted path."""


def field_help() -> dict[str, str]:
    """Help string of every leaf setting, by dotted path (for CLIs and docs)."""
    return {path: f.metadata.get("help", "") for path, f, _ in walk_schema(Recipe)}
