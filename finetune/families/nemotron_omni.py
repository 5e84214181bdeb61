"""The Nemotron-3-Nano-Omni family (30B-A3B): `NemotronH_Omni_Reasoning_V3`, text + image + audio in.

The model: a RADIO ViT vision tower (`vision_model`, packed images of any grid, 16-pixel
patches) whose features are pixel-shuffled 2x2 and projected by an MLP
(`multi_modal_projector`); an optional Parakeet (FastConformer) audio encoder (`audio_tower`,
8x subsampling of 10 ms mel frames) with its MLP (`embed_audio`); and a NemotronH LLM
(`language_model`) whose 52 layers are Mamba-2 mixers, attention (no positional encoding: order
comes from the Mamba layers) and mixtures of 128 experts (6 per token, a sigmoid router with a
bias correction, one shared expert).

Roles, by module path:

- `vision_encoder` = `vision_model` (+ `vision_final_layernorm`, the tower's output norm where a
  checkpoint has it); `vision_projector` = `multi_modal_projector`;
- `audio_encoder` = `audio_tower`; `audio_projector` = `embed_audio` (both absent from a
  checkpoint without an audio branch);
- `llm` = `language_model.model`: Mamba-2 mixers (`in_proj`, `out_proj`: linear layers, so LoRA and
  QLoRA reach them; `conv1d`, `A_log`, `D`, `dt_bias` and the gated norm train with the LLM in full),
  attention, the shared experts and the final norm; the routed experts are fused
  `mixer.experts.up_proj` / `down_proj` [experts, out, in] parameters (`roles.llm.experts: lora`:
  PEFT's target_parameters) and the routers `mixer.gate` (`roles.llm.router: full`);
- `embeddings` = `language_model.model.embeddings`; `lm_head` = `language_model.lm_head` (untied).

The load-balancing loss (`aux_loss`; the forward `install_forward` gives the model computes it)
is the switch-style loss of a sigmoid router: each layer's fraction of routed slots per expert
(the router's own choice, bias included) times the mean of its normalised sigmoid scores, times
the number of experts (1 when balanced). The released
config carries no coefficient (the model was balanced by the bias correction): it is logged every
step and joins the loss with `train.router_aux_loss_coef` when experts or routers train.

Prompt format: our rendering of the released template with reasoning off (the shipped
`nemotron_omni.chat_template.jinja`): a system turn always (empty without a system message), an
empty `<think></think>` at the start of every assistant turn, each image `<img>` + n x `<image>` +
`</img>` (n = the patch grid / 4) and each audio clip `<so_start>` + n x `<so_embedding>` +
`<so_end>` (n = the conformer's output length), each followed by a newline.

The processor and the prompt format's special tokens are in `nemotron_omni_processor`, the tiny
model in `nemotron_omni_tiny`, the Mamba-2 mixers' packed path in `nemotron_mamba`.

Packing:

- the LLM: attention isolates samples by its mask or varlen boundaries; every Mamba-2 mixer
  restarts its convolution and scan at each sample (`nemotron_mamba`: the CUDA kernels' `seq_idx`
  where installed, our exact masked scan elsewhere);
- images: RADIO runs packed images as one sequence with per-image boundaries (one varlen call per
  layer with ENCODER_VARLEN);
- audio: transformers' audio path keeps one more output row per clip than its encoder mask covers
  (`mask.sum() + 1` frames), and that row of a clip padded beside a longer clip differs from the
  clip alone (attention over the padding; 0.1 on the tiny model). Loading therefore runs the conformer
  one clip per call on the clip's own frames (`audio_one_by_one`), as the clip alone would be; the
  collator hands over each clip's frame count (no device read). The conformer's batch norms use
  their running statistics in training too (`frozen_batch_norms`): batch statistics would mix the
  clips of a row and change a frozen tower's statistics. Not verified: with weights sharded over
  several ranks (ZeRO-3, FSDP) ranks holding different numbers of clips call the tower a different
  number of times, which per-module gathers may not tolerate; the recipe trains on one GPU.
"""

from __future__ import annotations

import functools
import json
import math
import types
from pathlib import Path
from typing import Any

import torch

from finetune.data import media as M
from finetune.data.schema import DataError
from finetune.errors import ConfigError
from finetune.families import nemotron_mamba
from finetune.families import nemotron_omni_tiny as tiny
from finetune.families.base import (IGNORE_INDEX, EncodedSample, Family, HybridShape, LoadSpec, Stack, TowerShapes,
                                    part_field)
from finetune.families.nemotron_omni_processor import (AUDIO, AUDIO_END, AUDIO_START, IM_END, IM_START, IMAGE,
                                                       IMG_END, IMG_START, NemotronOmniProcessor)
from finetune.families.shared import TemplateTokens, chat_turns

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "generation_config.json",
)
HF_MODEL, HF_CONFIG = "NemotronH_Omni_Reasoning_V3", "NemotronH_Omni_Reasoning_V3_Config"
#: batch key of each audio clip's mel frames (a host tuple from the collator, Family.tower_inputs)
AUDIO_FRAMES = "audio_clip_frames"


def _hf(name: str):
    import transformers

    return getattr(transformers, name)


# ---- the model: audio clip by clip, batch norms frozen, router logits and the label head -------
def audio_one_by_one(model) -> None:
    """Run the audio tower (and its projector) one clip per call on the clip's own frames, as the
    clip alone is run (module docstring: transformers' kept rows of a clip padded beside a longer
    one differ). The clips' frame counts come from the collator (AUDIO_FRAMES) or, without them, from
    the mask. Wraps this instance's get_audio_features only; idempotent."""
    if getattr(model, "_audio_one_by_one", False) or model.audio_tower is None:
        return
    batched = model.get_audio_features
    state = model._nemotron_state

    def get_audio_features(input_features, input_features_mask=None, **kwargs):
        if input_features_mask is None or input_features.shape[0] == 1:
            return batched(input_features, input_features_mask, **kwargs)
        frames = state.pop("audio_frames", None)
        if frames is None or len(frames) != input_features.shape[0]:
            frames = [int(n) for n in input_features_mask.sum(-1).tolist()]
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outs = [batched(input_features[i:i + 1, :n + 1], input_features_mask[i:i + 1, :n + 1], **kwargs)
                for i, n in enumerate(frames)]
        return BaseModelOutputWithPooling(pooler_output=torch.cat([o.pooler_output for o in outs]))

    model.get_audio_features = get_audio_features
    model._audio_one_by_one = True


#: the LLM's packed-row arguments, which transformers' composite forward also hands to the vision
#: tower (whose own per-image boundaries they would override)
LLM_ONLY = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def images_without_llm_boundaries(model) -> None:
    """The vision tower never receives the LLM's packed-row boundaries (LLM_ONLY): transformers'
    forward passes its keyword arguments on to get_image_features, and RADIO's attention would take
    the text's cu_seq_lens for its own. Wraps this instance's get_image_features only; idempotent."""
    if "get_image_features" in vars(model):
        return
    inner = model.get_image_features

    def get_image_features(pixel_values, image_grid_hw=None, **kwargs):
        return inner(pixel_values, image_grid_hw, **{k: v for k, v in kwargs.items() if k not in LLM_ONLY})

    model.get_image_features = get_image_features


def frozen_batch_norms(module: torch.nn.Module) -> None:
    """Keep every BatchNorm of `module` on its running statistics, in training mode too (module
    docstring): `train()` leaves them in eval mode. Weights and buffers unchanged."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not getattr(m, "_frozen_stats", False):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: self, m)
            m._frozen_stats = True


def sigmoid_balance_loss(router_logits, biases, top_k: int) -> torch.Tensor:
    """Mean over layers of E x sum_e f_e P_e: f_e the fraction of a layer's routed slots that go to
    expert e (its top-k of sigmoid scores + correction bias, as the router chooses), P_e the mean
    of the normalised sigmoid scores (differentiable). 1 when every expert gets its share."""
    total = None
    for logits, bias in zip(router_logits, biases):
        scores = logits.float().sigmoid()
        E = scores.shape[-1]
        with torch.no_grad():
            chosen = torch.topk(scores + bias.to(scores.device, scores.dtype), top_k, dim=-1).indices
            f = torch.zeros(E, device=scores.device).scatter_add_(0, chosen.flatten(),
                                                                 torch.ones(chosen.numel(), device=scores.device))
            f = f / chosen.numel()
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        term = E * (f * p).sum()
        total = term if total is None else total + term
    return total / len(router_logits)


def balance_loss(model, router_logits) -> torch.Tensor:
    """`sigmoid_balance_loss` of a forward's router logits, with the model's routers' correction biases."""
    gates = [m for m in model.modules() if type(m).__name__ == "NemotronHTopkRouter"]
    return sigmoid_balance_loss(router_logits, [g.e_score_correction_bias for g in gates],
                                model.config.get_text_config().num_experts_per_tok)


def install_forward(model) -> None:
    """This instance's forward (weights and module names unchanged; idempotent): pops the collator's
    audio frame counts, returns the routers' logits and the load-balancing loss when
    output_router_logits is asked (the composite model drops them), and with `hidden_only` computes
    no logits and returns the LLM's last hidden state (the label-token loss head's backbone,
    Family.label_head_parts)."""
    if "forward" in vars(model):
        return
    original = model.forward
    state = model._nemotron_state
    backbone = model.language_model.model

    @functools.wraps(type(model).forward)
    def forward(*args, hidden_only: bool = False, **kwargs):
        frames = kwargs.pop(AUDIO_FRAMES, None)
        if frames is not None:
            state["audio_frames"] = tuple(frames)
        want_router = bool(kwargs.get("output_router_logits"))
        seen: dict = {}
        if hidden_only:
            ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=getattr(ref, "device", None))
        handle = backbone.register_forward_hook(lambda mod, a, out: seen.update(out=out)) \
            if (hidden_only or want_router) else None
        try:
            out = original(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
            state.pop("audio_frames", None)
        inner = seen.get("out")
        if hidden_only:
            out["last_hidden_state"] = inner.last_hidden_state
        if want_router and inner is not None and inner.router_logits:
            out["router_logits"] = inner.router_logits
            out["aux_loss"] = balance_loss(model, inner.router_logits)
        return out

    model.forward = forward


class NemotronOmniFamily(Family):
    """Nemotron-3-Nano-Omni (30B-A3B): `NemotronH_Omni_Reasoning_V3` trained and exported whole."""

    name = "nemotron_omni"
    model_types = ("nemotron_h_omni",)
    title = "Nemotron-3-Nano-Omni"
    media_keys = {"image": "pixel_values", "audio": "input_features"}
    modalities = frozenset({"image", "audio"})  # the released processor's video path is not covered here
    float_media = ("pixel_values", "input_features")
    shipped_configs = ("nemotron_3_nano_omni_30b_a3b.json",)
    role_prefixes = {
        "llm": ("language_model.model",),
        "embeddings": ("language_model.model.embeddings",),
        "lm_head": ("language_model.lm_head",),
        "vision_encoder": ("vision_model", "vision_final_layernorm"),
        "vision_projector": ("multi_modal_projector",),
        "audio_encoder": ("audio_tower",),
        "audio_projector": ("embed_audio",),
    }
    expert_params = ("mixer.experts.up_proj", "mixer.experts.down_proj")
    router_modules = ("mixer.gate",)
    processor_files = PROCESSOR_FILES
    processor_class = NemotronOmniProcessor
    folder_hint = ("Real weights are read from a local folder (download it once, e.g. with `huggingface-cli "
                   "download nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16 --local-dir DIR`)")
    # QLoRA quantises the LLM's linear layers only (Mamba in/out projections, attention, shared experts)
    quant_skip = ["lm_head", "vision_model", "vision_final_layernorm", "multi_modal_projector", "audio_tower",
                  "embed_audio"]

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        return self.patch_loaded(_hf(HF_MODEL).from_pretrained(str(folder), **kwargs))

    def patch_loaded(self, model):
        """Mamba-2 mixers that restart at sample boundaries, the vision tower without the LLM's
        boundaries, the audio tower clip by clip with frozen batch norms, the forward of
        `install_forward` (instance attributes and hooks only)."""
        if "_nemotron_state" not in vars(model):
            model._nemotron_state = {}
        nemotron_mamba.install(model)
        images_without_llm_boundaries(model)
        if model.audio_tower is not None:
            frozen_batch_norms(model.audio_tower)
            audio_one_by_one(model)
        install_forward(model)
        return model

    def rope_index(self, model_or_config) -> None:
        return None  # 1-D positions (the LLM has no rotary embedding; packing reads where they restart)

    def tower_inputs(self, model_or_config):
        """Each audio clip's mel frames as a host tuple (the clip-by-clip audio path reads no mask)."""
        return _audio_frames

    def encoder_attention_configs(self, model) -> list:
        tower = self.submodule(model, "vision_model")
        return [tower.config] if tower is not None else []

    def max_audio_samples(self, processor) -> int | None:
        """None: the released processor pads clips to the longest and never truncates (Parakeet's
        feature extractor at its defaults), and the conformer's relative positions have no limit."""
        return None

    def label_head_parts(self, model):
        """The LLM's hidden states without logits (`install_forward`'s hidden_only) and its lm_head:
        the composite model has no single base model of transformers' kind."""
        return (lambda *a, **k: model(*a, hidden_only=True, **k)), model.language_model.lm_head

    def aux_loss(self, outputs, inputs: dict, text_config) -> torch.Tensor:
        """`sigmoid_balance_loss` over the MoE layers' router logits, which the forward computes with
        the routers' correction biases (`install_forward`: the plain output and the label head's)."""
        aux = getattr(outputs, "aux_loss", None)
        if aux is None:
            raise RuntimeError(f"{self.title}: the forward returned no load-balancing loss; call it with "
                               "output_router_logits=True on a model loaded by this family")
        return aux

    # ---- encoding ----------------------------------------------------------------------
    def _render(self, sample, proc: NemotronOmniProcessor, for_generation: bool, on_image, on_audio):
        """(ids, labels) in the chat template's layout. `on_image(part)` gives the token counts of
        the images a part holds (processing them), `on_audio(part)` those of the clips an audio part
        is read as."""
        out = TemplateTokens(proc)

        messages = chat_turns(sample, proc.system_prompt, for_generation)
        system = ""
        if messages and messages[0].role == "system":
            system = "".join(p.text or "" for p in messages[0].parts if p.type == "text")
            messages = messages[1:]
        out.special(IM_START)
        out.text("system\n" + system)
        out.special(IM_END)
        out.text("\n")
        for msg in messages:
            if msg.role not in ("user", "assistant"):
                raise ConfigError(f"{getattr(sample, 'where', '')}: {self.title}'s chat format has one system turn "
                                  f"first, then user and assistant turns; got a {msg.role} turn later")
            learn = msg.role == "assistant" and msg.loss and not for_generation
            out.special(IM_START)
            out.text(msg.role + "\n" + ("<think></think>" if msg.role == "assistant" else ""))
            for part in msg.parts:
                if part.type == "text":
                    out.text(part.text or "", learn)
                elif part.type == "image":
                    for n in on_image(part):
                        out.special(IMG_START)
                        out.special(IMAGE, n=n)
                        out.special(IMG_END)
                        out.text("\n")
                elif part.type == "audio":
                    if not proc.has_audio:
                        raise DataError("bad_part", f"an audio part, but this {self.title} checkpoint has no audio "
                                        "branch (its config.json has no audio_config): the model would read its "
                                        "placeholders as text", "remove the sample's audio, or train a checkpoint "
                                        "with the audio encoder", file=sample.source, line=sample.line,
                                        field=part_field(sample, part))
                    for n in on_audio(part):
                        out.special(AUDIO_START)
                        out.special(AUDIO, n=n)
                        out.special(AUDIO_END)
                        out.text("\n")
                else:
                    raise ConfigError(f"{getattr(sample, 'where', '')}: {self.title} takes text, image and audio "
                                      f"parts, not {part.type}")
            out.special(IM_END, learn)
            out.text("\n")
        if for_generation:
            out.special(IM_START)
            out.text("assistant\n<think></think>")
        return out.done()

    def encode(self, sample, processor: NemotronOmniProcessor, *, for_generation: bool = False,
               rope: Any = None) -> EncodedSample:
        pix: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []

        def on_image(part) -> list[int]:
            out = []
            for img in M.load_images(part):  # a NIfTI part may give several slices
                pv, g = processor.process_image(img)
                pix.append(pv)
                grids.append(g)
                out.append(int(g.prod()) // processor.merge ** 2)
            return out

        def on_audio(part) -> list[int]:
            wave = M.load_audio(part.path, processor.sampling_rate)
            out = []
            for a, b in self.clip_spans(sample, part, processor, len(wave)):
                f, m = processor.process_audio(wave[a:b])
                feats.append(f)
                masks.append(m)
                out.append(processor.audio_tokens(b - a))
            return out

        ids, labels = self._render(sample, processor, for_generation, on_image, on_audio)
        media: dict[str, Any] = {}
        if pix:
            media["pixel_values"] = torch.cat(pix)
            media["image_grid_hw"] = torch.stack(grids)
        if feats:
            media["input_features"] = feats  # [frames, mels] each; the collator pads them at the end
            media["input_features_mask"] = masks
        input_ids = torch.tensor(ids, dtype=torch.long)
        lab = torch.tensor(labels, dtype=torch.long)
        lab[0] = IGNORE_INDEX  # a sample never learns its first token (packing contract)
        if for_generation:
            lab[:] = IGNORE_INDEX
        return EncodedSample(input_ids=input_ids, labels=lab, position_ids=torch.arange(len(ids)), media=media,
                             sample_id=sample.id or "", where=getattr(sample, "where", ""))

    def count_tokens(self, sample, processor: NemotronOmniProcessor) -> int:
        """From text, image sizes (headers) and clip lengths (headers) alone."""

        def images(part) -> list[int]:
            return [processor.image_tokens(w, h) for w, h in M.image_sizes(part)]

        def clips(part) -> list[int]:
            n = M.audio_samples(part.path, processor.sampling_rate)
            return [processor.audio_tokens(b - a) for a, b in self.clip_spans(sample, part, processor, n)]

        ids, _ = self._render(sample, processor, False, images, clips)
        return len(ids)

    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        return collate_media(batch)

    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        merge = round(1 / float(config.get("downsample_ratio", 0.5))) ** 2
        out = []
        if "image_grid_hw" in enc.media:
            tid = config.get("image_token_id", config.get("img_context_token_id"))
            out.append(("image", int(tid), int(enc.media["image_grid_hw"].prod(-1).sum()) // merge))
        if "input_features_mask" in enc.media:
            audio = config.get("audio_config") or config.get("sound_config") or {}
            factor = int(audio.get("subsampling_factor", 8))
            rows = 0
            for m in enc.media["input_features_mask"]:
                n = int(m.sum()) + 1  # the model keeps _get_subsampling_output_length(mask.sum() + 1) rows
                for _ in range(int(math.log2(factor))):
                    n = (n - 1) // 2 + 1
                rows += n
            tid = config.get("audio_token_id", config.get("sound_context_token_id"))
            out.append(("audio", int(tid), rows))
        return out

    def meta_model(self, config_path: Path):
        cfg = _hf(HF_CONFIG).from_pretrained(str(config_path))
        with torch.device("meta"):
            return _hf(HF_MODEL)._from_config(cfg, dtype=torch.bfloat16), cfg

    def random_checkpoint(self, config_path: Path, folder: Path, dtype: torch.dtype,
                          llm_layers: int | None = None) -> None:
        """Family.random_checkpoint; `llm_layers` keeps the first layers of the hybrid pattern (the
        LLM's depth is its layer-kind list, not num_hidden_layers)."""
        if llm_layers:
            cfg = _hf(HF_CONFIG).from_pretrained(str(config_path))
            cfg.text_config.layers_block_type = list(cfg.text_config.layers_block_type[:llm_layers])
            Path(folder).mkdir(parents=True, exist_ok=True)
            config_path = Path(folder) / "config.json"
            cfg.to_json_file(str(config_path))
        super().random_checkpoint(config_path, folder, dtype)

    def tower_shapes(self, config) -> TowerShapes:
        t, v, a = config.text_config, config.vision_config, config.audio_config
        # the MLP a token runs in an MoE layer: its top-k experts plus the shared expert (relu^2, not gated)
        moe = t.moe_intermediate_size * t.num_experts_per_tok + t.moe_shared_expert_intermediate_size
        return TowerShapes(
            llm=Stack(t.hidden_size, len(t.layers_block_type), moe, t.num_attention_heads, False),
            vision=Stack(v.hidden_size, v.num_hidden_layers, int(v.hidden_size * v.mlp_ratio), v.num_attention_heads,
                         False),
            audio=None if a is None else Stack(a.hidden_size, a.num_hidden_layers, a.intermediate_size,
                                               a.num_attention_heads, False),
            vocab=t.vocab_size, patches_per_token=round(1 / config.downsample_ratio) ** 2,
            frames_per_audio_token=8 if a is None else a.subsampling_factor, hybrid=hybrid_shape(t))

    def usage(self, full_layout: bool) -> list[str]:
        return ["```python",
                f"from transformers import {HF_MODEL}, AutoTokenizer",
                f"model = {HF_MODEL}.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/merged\")",
                f"# the adapter instead: PeftModel.from_pretrained({HF_MODEL}.from_pretrained(BASE), "
                "\"path/to/adapter_export\")",
                "```", "",
                "transformers' image processor for this model needs torchvision; the `mamba_ssm` and `causal_conv1d` "
                "packages give the Mamba-2 layers their CUDA kernels (PyTorch's reference path otherwise)."]

    def write_processor_settings(self, folder: Path, processor: NemotronOmniProcessor) -> None:
        """The exported processor config cuts images as training did: the recipe's pixels became the
        patch budget (min_num_patches, max_num_patches), which the base folder's config does not hold."""
        want = {"min_num_patches": processor.min_patches, "max_num_patches": processor.max_patches}
        for name in ("processor_config.json", "preprocessor_config.json"):
            p = Path(folder) / name
            if not p.exists():
                continue
            cfg = json.loads(p.read_text())
            section = cfg.get("image_processor") if isinstance(cfg.get("image_processor"), dict) else cfg
            if "max_num_patches" not in section and "min_num_patches" not in section:
                continue
            if all(section.get(k) == v for k, v in want.items()):
                continue
            section.update(want)
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_tiny}

    def export_class(self) -> type:
        return _hf(HF_MODEL)


def hybrid_shape(t) -> HybridShape:
    """The NemotronH layer mix and Mamba-2 sizes `plan` models (TowerShapes.hybrid)."""
    kinds = list(t.layers_block_type)
    return HybridShape(mamba=kinds.count("linear_attention"), attention=kinds.count("full_attention"),
                       moe=kinds.count("moe"), mlp=kinds.count("mlp"), mamba_heads=t.mamba_num_heads,
                       mamba_head_dim=t.mamba_head_dim, state=t.ssm_state_size, groups=t.n_groups,
                       conv=t.conv_kernel, chunk=t.chunk_size, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                       experts=t.n_routed_experts, top_k=t.num_experts_per_tok, moe_ffn=t.moe_intermediate_size,
                       shared_ffn=t.moe_shared_expert_intermediate_size, mlp_ffn=t.intermediate_size)


def _audio_frames(batch: dict) -> dict:
    """The collator's part of the clip-by-clip audio path: each clip's valid mel frames, on the host."""
    mask = batch.get("input_features_mask")
    if mask is None:
        return {}
    return {AUDIO_FRAMES: tuple(int(n) for n in mask.sum(-1).tolist())}


def collate_media(batch: list[EncodedSample]) -> dict[str, Any]:
    """Images' patches concatenated with their grids; audio clips padded at the end to the longest,
    with their valid-frame masks (clips are encoded one by one: padding never reaches a clip)."""
    out: dict[str, Any] = {}
    pix = [e.media["pixel_values"] for e in batch if "pixel_values" in e.media]
    if pix:
        out["pixel_values"] = torch.cat(pix)
        out["image_grid_hw"] = torch.cat([e.media["image_grid_hw"] for e in batch if "image_grid_hw" in e.media])
    feats = [f for e in batch for f in e.media.get("input_features", [])]
    masks = [m for e in batch for m in e.media.get("input_features_mask", [])]
    if feats:
        T = max(f.shape[0] for f in feats)
        x = torch.zeros(len(feats), T, feats[0].shape[1])
        m = torch.zeros(len(feats), T, dtype=torch.bool)
        for i, (f, fm) in enumerate(zip(feats, masks)):
            x[i, : f.shape[0]] = f
            m[i, : fm.shape[0]] = fm
        out["input_features"] = x
        out["input_features_mask"] = m
    return out
