"""The Family contract: everything model-specific lives behind it.

A Family knows how to load its model from a local folder (or build a tiny random one), which
module paths make up each role, how to turn a `Sample` into an `EncodedSample` (chat
template, label masking, media tensors, the sample's own positions), how to count a sample's
tokens before any encoder runs, how to batch encoded samples, and how to write a merged model
back into a complete checkpoint. The rest of the toolkit is written once against this class.
"""

from __future__ import annotations

import abc
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from finetune.checkpoint import assemble, copy_extras
from finetune.data import media as M
from finetune.data.schema import DataError
from finetune.errors import ConfigError, MissingFileError
from finetune.hub import resolve_model

if TYPE_CHECKING:  # families never import the trainer; data types only
    from finetune.data.schema import Sample

IGNORE_INDEX = -100

#: the roles every family maps to module paths of its model, in this order (DESIGN: Roles); a recipe
#: sets each one's mode (roles.<name>)
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


@dataclass(frozen=True)
class LoadSpec:
    """What `Family.load` needs to know (finetune.models.load_spec builds it from a recipe)."""

    path: str  # a local folder, `tiny:<name>` or a hub id
    revision: str = ""  # the hub revision of a hub id
    tiny_seed: int = 0
    quantize: str = "none"  # none | 4bit | 8bit: the LLM's linear layers (bitsandbytes)
    dtype: torch.dtype = torch.float32
    attn: str | None = None  # the attention implementation to load with
    #: ZeRO-3 / FSDP: 4-bit weights stored in the compute dtype, so the engine shards them as others
    sharded: bool = False
    #: the LLM trains in full (roles.llm.mode full): a family may keep training-only behaviour on
    llm_full: bool = False
    #: the processor's settings (Processor.from_folder): pixels, video sampling, prompt, long audio
    processor: dict = field(default_factory=dict)


@dataclass
class EncodedSample:
    """One sample, tokenised and with its media tensors, ready for a collator.

    `position_ids` are the positions the model computes for this sample when it sees it alone:
    shape [L] for 1-D RoPE families, [3, L] (t/h/w) for M-RoPE families. `media` holds the
    tensors the model takes for this sample only, keyed by the model's forward argument names.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    media: dict[str, Any] = field(default_factory=dict)
    sample_id: str = ""
    where: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class LoadedModel:
    """What `Family.load` returns: the model, the encoder (processor) and where they came from."""

    model: torch.nn.Module
    processor: Any
    base_path: Path
    is_full_checkpoint: bool = False
    info: dict = field(default_factory=dict)


class Stack(NamedTuple):
    """A transformer stack's shape, as the planner's activation arithmetic reads it."""

    hidden: int
    layers: int
    ffn: int  # the MLP's inner width
    heads: int
    gated: bool  # SwiGLU MLP (gate/up/down) vs GELU MLP (fc1/fc2)


class HybridShape(NamedTuple):
    """A hybrid LLM's layer mix and sizes (Mamba-2 mixers, attention, MoE and MLP layers, one kind
    per layer), as the planner's activation arithmetic reads it layer kind by layer kind."""

    mamba: int  # layers of each kind
    attention: int
    moe: int
    mlp: int
    mamba_heads: int
    mamba_head_dim: int
    state: int  # the SSM state size N
    groups: int  # B/C groups G
    conv: int  # the causal convolution's width
    chunk: int  # the chunked scan's chunk length
    kv_heads: int
    head_dim: int
    experts: int  # routed experts
    top_k: int
    moe_ffn: int  # one routed expert's inner width
    shared_ffn: int  # the shared expert's
    mlp_ffn: int  # a dense MLP layer's


@dataclass(frozen=True)
class TowerShapes:
    """What `Family.tower_shapes` gives the planner and the benchmarks about a model's config."""

    llm: Stack
    vision: Stack | None  # None: the model has no such tower (or the config disables it)
    audio: Stack | None
    vocab: int
    patches_per_token: int  # vision-tower positions per image token
    frames_per_audio_token: int  # audio-tower positions per audio token
    #: a hybrid LLM's layer mix (the planner then counts each layer kind as it is); None: every
    #: layer of the LLM is the `llm` stack's transformer layer
    hybrid: HybridShape | None = None


@dataclass(frozen=True)
class MergedExport:
    """What `Family.save_merged` wrote into an export folder."""

    files: list[str]  # the weight shards and their index
    kept_tensors: list[str]  # base tensors copied unchanged (the export checks them bit for bit), sorted
    layout: str  # the manifest's name of the folder's layout
    trained_tensors: int = 0  # tensors written from the merged model
    copied: list[str] = field(default_factory=list)  # the base folder's other files, copied unchanged


@typing.runtime_checkable
class Processor(typing.Protocol):
    """What the package outside a family uses of that family's processor (`Family.processor`):
    the family's own methods (encode, count_tokens, collate_*) use the rest."""

    #: the model folder's tokenizer (generation decodes with it; its chat template is checked)
    tokenizer: Any
    #: data.long_audio: what a clip longer than `Family.max_audio_samples` becomes (error | split | truncate)
    long_audio: str
    #: the rate audio is read at (samples per second: the unit of `Family.max_audio_samples`)
    sampling_rate: int

    @property
    def pad_id(self) -> int:
        """Token id of padding (rows, generation batches)."""

    @property
    def eos_id(self) -> int:
        """Token id that ends an answer (generation stops on it)."""

    def settings(self) -> dict:
        """The settings that change encodings (pixels, fps, prompt, long_audio): keys of the samples' check record."""

    @classmethod
    def from_folder(cls, folder: Path, **settings) -> "Processor":
        """The processor of a model folder with the recipe's settings (min_pixels, max_pixels,
        video_fps, video_max_frames, system_prompt, long_audio; use_audio_in_video where the family
        has `audio_in_video`)."""


class Family(abc.ABC):
    """Base class of a model family. Subclasses set `name` and `role_prefixes`."""

    name: str = ""
    #: role -> module-path prefixes (relative to the bare model, not a PEFT wrapper). The longest
    #: matching prefix wins, so `model.visual.merger` can be the projector inside `model.visual`.
    role_prefixes: dict[str, tuple[str, ...]] = {}
    #: M-RoPE families add a text row on top of their t/h/w positions when packing.
    mrope: bool = False

    def packed_positions(self, enc: "EncodedSample") -> torch.Tensor:
        """[rows, n] position ids of one sample inside a packed row, restarting at 0 for it:
        its own positions (1-D RoPE: one row), or for M-RoPE a per-sample text row first, then
        its t/h/w rows (the layout transformers reads packed boundaries from). Every sample of
        a family gives the same number of rows."""
        if enc.position_ids.dim() == 1:
            return enc.position_ids[None]
        return torch.cat([torch.arange(enc.num_tokens)[None], enc.position_ids])
    #: Files beside the weights that a loader needs (tokenizer, processor, templates, ...);
    #: copied from the base folder into adapters and exports.
    processor_files: tuple[str, ...] = ()
    #: config.json `model_type` values of the family's folders, and its name in messages.
    model_types: tuple[str, ...] = ()
    title: str = ""
    #: media kind -> the EncodedSample.media key that carries it: each kind is one tower call per
    #: forward (packing.idle_media makes every rank run every tower when weights are sharded)
    media_keys: dict[str, str] = {}
    #: the media kinds (image, audio, video) a sample may hold for this family's model, as its
    #: released processor takes them; a sample with another kind is a located error before the
    #: first step (or skipped and counted under data.on_error: skip), and `data check --recipe`
    #: names it. The README's roles table lists them per family.
    modalities: frozenset[str] = frozenset()
    #: configs of released models in finetune/configs/, for `plan` without the weights (config:<stem>)
    shipped_configs: tuple[str, ...] = ()
    #: the floating-point media tensors of a batch that take the model's dtype (video seconds per
    #: grid stay fp32: rounding them would move M-RoPE positions)
    float_media: tuple[str, ...] = ()

    #: mixture-of-experts LLMs: suffixes of the fused expert weights ([experts, out, in] parameters,
    #: LoRA through PEFT's target_parameters with roles.llm.experts: lora) and of the router modules
    #: (trained with roles.llm.router: full); empty for dense LLMs
    expert_params: tuple[str, ...] = ()
    router_modules: tuple[str, ...] = ()

    @property
    def is_moe(self) -> bool:
        """The LLM is a mixture of experts (it has expert weights): the trainer asks for the router
        logits in every step, logs the load-balancing loss and adds it when experts or routers train."""
        return bool(self.expert_params)

    def aux_loss(self, outputs, inputs: dict, text_config) -> torch.Tensor:
        """A mixture-of-experts LLM's load-balancing loss of one forward (`outputs`: the model's own,
        or the label head's with the router logits; `text_config` the LLM's), as the model computes
        it; dense LLMs have none."""
        raise NotImplementedError(f"{self.title} has no mixture-of-experts LLM")

    def label_head_parts(self, model) -> tuple[Any, torch.nn.Module]:
        """(backbone, lm_head) of a loaded model (unwrapped) for the label-token loss head
        (finetune.loss.add_label_head): the callable whose output has `last_hidden_state` (and the
        router logits when asked), and the output projection. transformers' base model and output
        embeddings, unless the family's composite model has no such base model."""
        return model.base_model, model.get_output_embeddings()

    def aux_loss_coef(self, model) -> float:
        """The coefficient the model's config gives the load-balancing loss (train.router_aux_loss_coef
        null takes it)."""
        return float(getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)

    #: whether the family's released processor reads a video file's own sound track with its frames
    #: (transformers' `use_audio_in_video`: the sound's tokens interleaved with the video's by time);
    #: without it a video is read for its frames only and its sound is ignored (`data check` says so)
    audio_in_video: bool = False

    def max_audio_samples(self, processor) -> int | None:
        """The longest audio clip, in samples at `processor.sampling_rate`, that the family's released
        processor reads whole (it cuts what is longer, there); None when it reads a clip of any length.
        A longer clip is refused, split or truncated as `data.long_audio` says (`clip_spans`)."""
        return None

    # ---- audio the family reads ----------------------------------------------------------
    def reads_video_sound(self, sample: "Sample", part, processor) -> bool:
        """Whether a video part is read with its own sound: the family has `audio_in_video`, and the
        part's own "use_audio_in_video" (else the recipe's model.use_audio_in_video) says so."""
        if not self.audio_in_video or part.type != "video":
            return False
        want = part.extra.get("use_audio_in_video", getattr(processor, "use_audio_in_video", False))
        if not isinstance(want, bool):
            raise DataError("bad_part", f"'use_audio_in_video' is {want!r}, not true or false",
                            "write true (read the video's sound with its frames) or false",
                            file=sample.source, line=sample.line, field=part_field(sample, part, "use_audio_in_video"))
        return want

    def video_sound(self, sample: "Sample", part, processor):
        """The sound track a video part is read with (float32 mono at the processor's rate), or None:
        not asked for (`reads_video_sound`), or the file has none (a silent video is read as a plain
        one, as transformers' processor does)."""
        if not self.reads_video_sound(sample, part, processor) or part.path is None:
            return None
        return M.load_video_audio(part.path, processor.sampling_rate)

    def audio_clips(self, sample: "Sample", processor) -> list[tuple[Any, int, bool]]:
        """(part, samples at the processor's rate, whether it is a video's sound) of every clip the
        family reads from a sample, in order: audio parts (length from the header), and videos read
        with their sound (decoded: a container's header does not give the exact count)."""
        out = []
        for msg in sample.messages:
            for part in msg.parts:
                if part.type == "audio" and "audio" in self.media_keys:
                    out.append((part, M.audio_samples(part.path, processor.sampling_rate), False))
                elif part.type == "video" and "video" in self.media_keys:
                    wave = self.video_sound(sample, part, processor)
                    if wave is not None:
                        out.append((part, len(wave), True))
        return out

    def clip_spans(self, sample: "Sample", part, processor, n: int, *, video: bool = False) -> list[tuple[int, int]]:
        """The (start, end) sample ranges a clip of `n` samples is encoded as: the whole clip when the
        family's processor reads it whole; past `max_audio_samples`, its first part (`truncate`: what
        the processor cuts it to at inference) or consecutive clips of at most the limit, as equal as
        whole samples allow (`split`: each encoded as its own audio item). `error`, and `split` of a
        video's sound (one track per video), raise a DataError located at the sample's line."""
        limit = self.max_audio_samples(processor)
        if limit is None or n <= limit:
            return [(0, n)]
        mode = processor.long_audio
        if mode == "truncate":
            return [(0, limit)]
        if mode == "split" and not video:
            k = -(-n // limit)
            bounds = [n * i // k for i in range(k + 1)]
            return list(zip(bounds[:-1], bounds[1:]))
        raise long_audio_error(sample, part, n, limit, processor.sampling_rate, self.title, video=video)

    # ---- loading -----------------------------------------------------------------------
    #: module-path prefixes QLoRA leaves unquantised (everything but the LLM's linear layers)
    quant_skip: list[str] = []

    def load(self, spec: LoadSpec) -> LoadedModel:
        """Load the trainable model and its processor from `spec.path`: the folder resolved and
        checked, `load_model` with the from_pretrained arguments (dtype, attention, QLoRA's
        bitsandbytes config), the KV cache off (training never uses it, and transformers derives
        packed masks only without one), the processor with the spec's settings."""
        folder = self.resolve_path(spec.path, spec.tiny_seed, spec.revision)
        self.read_config(folder)
        model = self.load_model(folder, load_kwargs(self, spec), spec)
        model.config.use_cache = False
        model.config.get_text_config().use_cache = False
        return LoadedModel(model=model, processor=self.processor(folder, spec.processor), base_path=folder,
                           is_full_checkpoint=self.is_full(folder),
                           info={"quantize": spec.quantize, "dtype": str(spec.dtype).replace("torch.", "")})

    @abc.abstractmethod
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        """The trainable model of a checked model folder, loaded with `kwargs` (from_pretrained's)."""

    def is_full(self, folder: Path) -> bool:
        """The folder is a complete checkpoint (with the speech output, where the family has one)."""
        return True

    @abc.abstractmethod
    def rope_index(self, model_or_config) -> Any:
        """What `encode(rope=...)` takes to compute a sample's own positions (None for 1-D RoPE)."""

    def tower_inputs(self, model_or_config) -> Any:
        """A callable the collators apply to a collated batch: extra model inputs the media towers
        would otherwise derive on the device from the batch's grids and lengths (boundaries,
        positions, orders), computed on the host instead; None when the family has none."""
        return None

    def encoder_attention_configs(self, model) -> list:
        """Configs of the towers whose attention takes ENCODER_VARLEN (one varlen call per layer
        over all of a batch's images, windows or chunks, from transformers' cu_seqlens)."""
        return []

    @staticmethod
    def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
        """The module at `path` of the bare model, in a PEFT wrapper too; None when absent."""
        for prefix in ("", "base_model.model."):
            try:
                return model.get_submodule(prefix + path)
            except AttributeError:
                continue
        return None

    def materialize_tiny(self, seed: int = 0) -> Path:
        """The tiny random model of this family (`tiny:<name>`), built into a cached folder on first use."""
        return self.tiny_models()[self.name](seed)

    # ---- roles -------------------------------------------------------------------------
    def role_of(self, name: str) -> str | None:
        """The role a parameter or module path belongs to (PEFT prefixes are stripped)."""
        name = strip_peft_prefix(name)
        best, best_len = None, -1
        for role, prefixes in self.role_prefixes.items():
            for p in prefixes:
                if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                    best, best_len = role, len(p)
        return best

    def present_roles(self, model: torch.nn.Module) -> list[str]:
        """Roles that own at least one parameter in this model."""
        seen = {self.role_of(n) for n, _ in model.named_parameters()}
        return [r for r in ROLE_NAMES if r in seen]

    # ---- data --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, sample: "Sample", processor: Any, *, for_generation: bool = False, rope: Any = None) -> EncodedSample:
        """Tokenise a sample with the chat template; labels on assistant turns only.

        With `for_generation` the last assistant turn is dropped and the generation prompt is
        appended (labels are then all ignored).
        """

    @abc.abstractmethod
    def count_tokens(self, sample: "Sample", processor: Any) -> int:
        """The sample's token count from text and media metadata, without running encoders."""

    @abc.abstractmethod
    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        """(kind, placeholder token id, feature rows) for each media kind the model's forward will
        scatter: the token id as the model's config names it, and how many rows its encoders
        produce for this sample's media tensors (computed from their shapes, no encoder runs).
        `config` is the model folder's config.json."""

    def check_encoded(self, enc: EncodedSample, config: dict, planned: int | None = None) -> list[str]:
        """What the model's forward would refuse about this sample, found before training: each
        media kind's placeholder tokens against the feature rows its encoder will give, and the
        encoded length against the length planned from metadata (the packing plan used it)."""
        problems = []
        for kind, token_id, rows in self.media_placeholders(enc, config):
            have = int((enc.input_ids == token_id).sum())
            if have != rows:
                problems.append(f"{have} {kind} placeholder token(s) (id {token_id}) but its {kind} gives {rows} "
                                f"feature row(s): the prompt and the {kind} preprocessing disagree")
        if planned is not None and planned != enc.num_tokens:
            problems.append(f"encodes to {enc.num_tokens} tokens, but {planned} were planned from its media "
                            "metadata (headers, durations, frame counts)")
        return problems

    def collate_padded(self, batch: list[EncodedSample], pad_id: int, side: str = "right") -> dict[str, Any]:
        """A padded batch (right for training, left for generation) with an attention mask."""
        L = max(e.num_tokens for e in batch)
        input_ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, e in enumerate(batch):
            n = e.num_tokens
            sl = slice(0, n) if side == "right" else slice(L - n, L)
            input_ids[i, sl] = e.input_ids
            labels[i, sl] = e.labels
            mask[i, sl] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        out.update(self.collate_media(batch))
        return out

    @abc.abstractmethod
    def meta_model(self, config_path: Path) -> tuple[torch.nn.Module, Any]:
        """(the trainable model on the meta device, its config) from a config.json: for planning."""

    def random_checkpoint(self, config_path: Path, folder: Path, dtype: torch.dtype,
                          llm_layers: int | None = None) -> None:
        """A checkpoint of `meta_model`'s architecture with random weights, saved like a released
        folder (benchmarks of the real shapes; built on the GPU when there is one); `llm_layers`
        keeps only that many decoder layers (widths unchanged) of a model too large to write."""
        model, cfg = self.meta_model(Path(config_path))
        if llm_layers:
            cfg.get_text_config().num_hidden_layers = llm_layers
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                torch.manual_seed(0)
                model = type(model)._from_config(cfg, dtype=dtype)
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(str(folder), max_shard_size="5GB")

    @abc.abstractmethod
    def tower_shapes(self, config: Any) -> TowerShapes:
        """The LLM's and the towers' stack shapes, the vocabulary, and the tower positions per image
        and per audio token, from a model config (the planner's arithmetic, the benchmarks' FLOPs)."""

    def usage(self, full_layout: bool) -> list[str]:
        """Markdown lines for the exported model card: how to load the export (and its adapter)."""
        return []

    def serving(self, full_layout: bool) -> list[str]:
        """Markdown lines for the model card's "Serve it" section beyond the toolkit's own chat and
        serve commands: a serving engine's command that was tested on this family's exports."""
        return []

    @abc.abstractmethod
    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        """The batch's media tensors in sample order (shared by padded and packed batches)."""

    # ---- folders -----------------------------------------------------------------------
    @classmethod
    def read_config(cls, folder: Path) -> dict:
        """config.json of a folder, with a clear error when it is not one of this family's."""
        import json

        p = Path(folder) / "config.json"
        if not p.exists():
            raise MissingFileError(f"{folder}: no config.json; model.path must be a local model folder")
        cfg = json.loads(p.read_text())
        if cfg.get("model_type") not in cls.model_types:
            raise ConfigError(f"{p}: model_type {cfg.get('model_type')!r} is not {cls.title} "
                             f"(expected {' or '.join(cls.model_types)})")
        return cfg

    def saved_dtype(self, folder: Path) -> str | None:
        """The dtype name a checkpoint folder's config says its weights were saved in, if any."""
        cfg = self.read_config(folder)
        return cfg.get("dtype") or cfg.get("torch_dtype")

    processor_class: type | None = None  # a Processor class (from_folder(folder, min_pixels=, ...))
    folder_hint: str = ""  # what model.path should point at, for error messages

    @abc.abstractmethod
    def tiny_models(self) -> dict[str, Any]:
        """`tiny:<name>` variants this family builds: name -> materialize(seed) -> folder (the builders
        live in the family's `<family>_tiny` module); one of them is named as the family."""

    def resolve_path(self, path: str, tiny_seed: int = 0, revision: str = "") -> Path:
        """`tiny:<name>` -> the cached tiny folder (built on first use); a local folder as it is; a
        hub id (org/name) -> its snapshot folder in the HF cache at `revision` (finetune.hub)."""
        if path.startswith("tiny:"):
            builders = self.tiny_models()
            name = path.split(":", 1)[1]
            if name not in builders:
                raise ConfigError(f"model.path {path!r}: unknown tiny model; use one of "
                                 + ", ".join(f"tiny:{n}" for n in builders))
            return builders[name](tiny_seed)

        return resolve_model(path, revision, hint=self.folder_hint)

    def processor(self, folder: Path, settings: dict | None = None) -> Processor:
        """The processor of a model folder with the recipe's settings (LoadSpec.processor:
        min_pixels, max_pixels, video_fps, video_max_frames, system_prompt, long_audio, and
        use_audio_in_video where the family has `audio_in_video`)."""
        kw = dict(settings or {})
        if kw.pop("use_audio_in_video", False):
            if not self.audio_in_video:
                raise ConfigError(f"model.use_audio_in_video: true, but {self.title}'s processor reads no sound "
                                  "from a video (its videos are read for their frames); set it to false")
            kw["use_audio_in_video"] = True
        return self.processor_class.from_folder(folder, **kw)

    # ---- export ------------------------------------------------------------------------
    def copy_processor_files(self, src: Path, dst: Path) -> None:
        """Copy `processor_files` that exist in `src` and not yet in `dst`."""
        for name in self.processor_files:
            p = Path(src) / name
            if p.exists() and not (Path(dst) / name).exists():
                shutil.copy2(p, Path(dst) / name)

    def write_processor_settings(self, folder: Path, processor: Any) -> None:
        """Make an exported folder's processor config preprocess as training did (default: as is)."""

    # The export template: `save_merged` writes the merged model in the base's layout and the
    # check loads read it back; a family fills in the hooks below them.
    #: the base folder lacks generation_config.json: the export takes the one transformers writes
    #: for the merged model (a family whose export keeps the released folder's files says False)
    generation_config_from_merged: bool = True
    #: what `save_quantized`'s description adds about the family's quantised export
    quantized_note: str = ""

    def save_merged(self, model: torch.nn.Module, loaded: LoadedModel, out_dir: Path, *,
                    dtype: torch.dtype, max_shard_size: str) -> MergedExport:
        """Write a complete, loadable checkpoint of the merged model into `out_dir`, in the base's
        layout: the model saved to a staging folder beside it, its tensors written under the base's
        names (`merged_prefix`) with every base tensor it does not hold copied unchanged, the
        config (`merged_config_from_stage`: the merged model's; else the base's, with its other
        files), the processor settings training used."""
        out_dir = Path(out_dir)
        model = model.to(dtype)
        self.prepare_merged(model, loaded)
        own_config = self.merged_config_from_stage(loaded)
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out_dir))
        try:
            model.save_pretrained(str(stage), safe_serialization=True, max_shard_size="1000GB")
            written = assemble(stage, loaded.base_path, out_dir, prefix=self.merged_prefix(loaded),
                               max_shard_size=max_shard_size)
            if own_config:
                shutil.copyfile(stage / "config.json", out_dir / "config.json")
            gen = "generation_config.json"
            if self.generation_config_from_merged and not (loaded.base_path / gen).exists() and (stage / gen).exists():
                shutil.copyfile(stage / gen, out_dir / gen)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        copied = copy_extras(loaded.base_path, out_dir, skip=("config.json",) if own_config else ())
        self.write_processor_settings(out_dir, loaded.processor)
        return MergedExport(files=written.files, kept_tensors=written.kept_tensors, trained_tensors=written.trained_tensors,
                            layout=self.merged_layout(loaded.is_full_checkpoint, written.kept_tensors), copied=copied)

    def prepare_merged(self, model: torch.nn.Module, loaded: LoadedModel) -> None:
        """Set the merged model's config as the export should have it: the KV cache on (loading
        switched it off for training); a family undoes its other training-time settings here."""
        model.config.use_cache = True
        model.config.get_text_config().use_cache = True

    def merged_prefix(self, loaded: LoadedModel) -> str:
        """What the trained model's tensor names take in the base's checkpoint (a full checkpoint's
        `thinker.`, say)."""
        return ""

    def merged_config_from_stage(self, loaded: LoadedModel) -> bool:
        """The export's config.json is the one transformers writes for the merged model (its dtype,
        cache on); False: the base's, copied unchanged with its other files."""
        return True

    def merged_layout(self, full: bool, kept: list[str]) -> str:
        """The manifest's name of an export's layout (`full`: a full checkpoint's; `kept`: the base
        tensors it copied unchanged)."""
        return self.model_types[0]

    @abc.abstractmethod
    def export_class(self) -> type:
        """The class whose from_pretrained reads an export's trainable model (and a quantised one)."""

    def read_export(self, folder: Path, kwargs: dict) -> torch.nn.Module:
        """An export folder's trainable model, read the way users read it, with from_pretrained's `kwargs`."""
        return self.export_class().from_pretrained(str(folder), **kwargs)

    def patch_loaded(self, model: torch.nn.Module) -> torch.nn.Module:
        """What every load of the family's model gets, for training and for the export's checks
        (instance attributes and hooks; weights and module names unchanged)."""
        return model

    def load_merged_for_check(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        """Load an exported checkpoint's trainable model (for verification)."""
        return self.patch_loaded(self.read_export(Path(folder), {"dtype": dtype}))

    def check_quantizable(self, merged_dir: Path) -> None:
        """Refuse an export `save_quantized` cannot write (a ConfigError naming the fix)."""

    def save_quantized(self, merged_dir: Path, out_dir: Path, *, quantize: str, dtype: torch.dtype) -> str:
        """`export.quantize`: the merged model in out_dir with bitsandbytes 4/8-bit on the LLM's
        linear layers (as QLoRA quantises them); returns a description of the format for the manifest."""
        self.check_quantizable(Path(merged_dir))
        cfg = quantization_config(quantize, dtype, self.quant_skip)
        model = self.export_class().from_pretrained(str(merged_dir), dtype=dtype, quantization_config=cfg)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        self.copy_processor_files(merged_dir, out_dir)
        return ("bitsandbytes NF4 with double quantisation" if quantize == "4bit" else "bitsandbytes int8") + \
            f" on the LLM's linear layers, compute dtype {str(dtype).replace('torch.', '')}" + self.quantized_note

    def load_quantized_for_check(self, folder: Path) -> torch.nn.Module:
        """Load what `save_quantized` wrote (for the comparison with merged/)."""
        return self.patch_loaded(self.read_export(Path(folder), {}))


def part_field(sample: "Sample", part, key: str = "path") -> str:
    """The JSON field path of a part of a sample (`messages[i].content[j].path`), for messages."""
    for i, msg in enumerate(sample.messages):
        for j, p in enumerate(msg.parts):
            if p is part:
                return f"messages[{i}].content[{j}].{key}"
    return ""


def long_audio_error(sample: "Sample", part, n: int, limit: int, rate: int, title: str, *, video: bool = False):
    """The DataError of a clip of `n` samples past a processor's `limit` (`data.long_audio: error`):
    its duration, the limit and the fixes, at the sample's file:line and the part's field."""
    lim = f"{limit / rate:g} s"
    dur = f"{n / rate:.1f} s"
    if dur == f"{limit / rate:.1f} s":  # just past the limit: the samples say by how much
        dur = f"{n / rate:.4f} s ({n - limit} sample(s) past it)"
    what = "the video's sound track" if video else "the audio clip"
    problem = f"{what} is {dur} long, longer than the {lim} that {title}'s processor reads (it cuts the rest)"
    if video:
        fix = (f"set data.long_audio: truncate (its first {lim}, as the processor reads it; split does not apply to "
               "a video's sound, one track per video), read the video without its sound (use_audio_in_video: "
               "false), or cut the video")
    else:
        fix = (f"cut the clip to at most {lim}, or set data.long_audio: split (consecutive clips of at most {lim}, "
               f"each its own audio item) or truncate (its first {lim}, as the processor reads it)")
    return DataError("long_audio", problem, fix, file=sample.source, line=sample.line, field=part_field(sample, part))


def strip_peft_prefix(name: str) -> str:
    """`base_model.model.x.y` -> `x.y`; also removes PEFT's wrapper segments."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for seg in (".base_layer", ".original_module", ".modules_to_save.default"):
        name = name.replace(seg, "")
    return name


def load_kwargs(family: "Family", spec: LoadSpec) -> dict:
    """from_pretrained's arguments for a spec: the dtype, the attention implementation, and QLoRA's
    bitsandbytes config (the LLM's linear layers only; sharded storage under ZeRO-3 / FSDP)."""
    kwargs: dict = {"dtype": spec.dtype}
    if spec.attn:
        kwargs["attn_implementation"] = spec.attn
    if spec.quantize in ("4bit", "8bit"):
        kwargs["quantization_config"] = quantization_config(spec.quantize, spec.dtype, family.quant_skip,
                                                             sharded=spec.sharded)
    return kwargs


def processor_settings(folder: Path, keep: tuple[str, ...] = ()) -> dict:
    """A model folder's preprocessor_config.json and processor_config.json merged flat: transformers 5
    nests the sub-processors' settings, older checkpoints keep them flat; other nested values are
    dropped unless named in `keep`."""
    import json

    cfg: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        p = Path(folder) / name
        if p.exists():
            data = json.loads(p.read_text())
            for sub in ("image_processor", "feature_extractor"):
                if isinstance(data.get(sub), dict):
                    cfg.update(data[sub])
            cfg.update({k: v for k, v in data.items() if not isinstance(v, dict) or k in keep})
    return cfg


def quantization_config(quantize: str, dtype: torch.dtype, skip: list[str], *, sharded: bool = False):
    """bitsandbytes config that quantises the LLM's linear layers only (NF4 + double quant).

    `sharded` (ZeRO-3, FSDP): the packed 4-bit weights are stored in the compute dtype instead
    of uint8, the same bytes, so that the engine can shard and gather them like the other
    floating-point weights (bitsandbytes' `bnb_4bit_quant_storage`)."""
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
            llm_int8_skip_modules=list(skip),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
