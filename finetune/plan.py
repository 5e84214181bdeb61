"""`python -m finetune plan RECIPE`: how much GPU memory a recipe needs, without loading weights.

The model is built on the `meta` device from its config.json (no memory, no weights), every
parameter is mapped to its role with the family's `role_of`, and the recipe's roles decide
what is LoRA / full / frozen exactly as training does (`adapters.plan_roles`). The rest is
arithmetic; every formula and assumption is written next to the code that uses it:

weights      bytes per parameter: compute dtype (bf16 = 2, fp32 = 4) for everything, except the
             LLM's linear layers outside the family's `quant_skip` list when quantised:
             4-bit NF4 with double quantisation = 0.5 byte + 1/64 byte (8-bit absmax per 64-value
             block) + 4/(64*256) byte (fp32 second-level constant per 256 blocks) ~ 0.516 byte;
             8-bit LLM.int8 = 1 byte + one fp32 scale per output row.
trainable    LoRA: r*(in+out) per targeted linear (r*(num+dim) per targeted embedding);
             full roles: all their parameters (PEFT's modules_to_save keeps a trainable copy
             beside the frozen base weight, which stays counted under weights).
             Assumption (deliberately simple, an upper bound): every trainable parameter has an
             fp32 copy (4 bytes) and an fp32 gradient (4 bytes), plus optimizer state: AdamW
             8 bytes (two fp32 moments), adamw_8bit / paged_adamw_8bit 2 bytes.
             Per GPU under the strategy (train.distributed / train.deepspeed, or every one in
             the strategy table): DDP and one GPU keep everything; ZeRO-2 divides the
             gradients, fp32 copies and optimizer states by N; ZeRO-3 and FSDP divide the weights
             too (4-bit ones included) and add the weights gathered at a time: two decoder layers
             (the one running and the one prefetched) or the embedding/lm_head when larger.
             `-offload` presets keep the fp32 copies and optimizer states in host memory
             (zero3-offload the weights as well), leaving the gradient partitions on the GPU.
activations  LLM decoder layers, after Korthikanti et al. 2022 ("Reducing activation
             recomputation in large transformer models"): per token per layer, in 16-bit,
             34*h bytes for a 4h GELU MLP (+ 5*a*s for the attention matrix, which flash/SDPA
             kernels do not store: only counted with model.attn=eager). Split as 4*h (two norms)
             + 11*h (attention) + MLP, with the MLP term re-derived for the real MLP width I:
             GELU MLP 2*h + 4*I (+ dropout mask, none here), SwiGLU MLP 2*h + 8*I (gate, up,
             act(gate), product). Tokens = data.max_tokens * train.batch_size.
             With gradient checkpointing only each layer's input (2*h bytes per token per layer)
             is kept, plus one layer's full activations while it is recomputed.
logits       tokens * vocab * 4 bytes: the fp32 copy of the logits for the loss (a chunked
             loss would cut this; the bf16 logits and their gradient come on top transiently).
encoders     the most media a packed row can hold: an encoder sees all of a row's images (or
             audio) in one call, and a row has at most max_tokens media tokens. One image token
             is 2x2 merged patches (both families), so a row feeds the vision tower at most
             4 * max_tokens patches; one audio token is 2 encoder frames for Qwen2.5-Omni (25
             tokens/s from 50 frames/s) and 4 for Baichuan-Omni-1.5 (12.5/s). Each tower (width
             h_v, depth L_v, MLP I_v) takes the LLM's per-layer formula. A frozen encoder keeps
             nothing for backward: only one layer's activations exist at a time. A trained one
             (lora/full) stores all layers (or layer inputs with checkpointing). A row is all
             image or all audio tokens at worst, so the bound is the larger of the two.
hybrid LLMs  (a family's `tower_shapes` gives `hybrid`: Mamba-2 / attention / MoE / MLP layers, as
             NemotronH mixes them) each layer kind by its own formula, per token, 16-bit: every
             block stores its norm's input (2h). Attention (no rotary): the QKV input 2h, Q and the
             output 2 * 2*a*d, K and V 2 * 2*kv*d. MoE: router input 2h + fp32 scores 4*E, per
             routed slot (top-k) and for the shared expert a relu^2 MLP 2h + 4*I. Mamba-2: in_proj
             input 2h, its output 2*(2*d_in + 2*G*N + H) (gate, conv input, dt), the convolution's
             output 2*(d_in + 2*G*N) (the scan's x, B, C), dt and its cumulative decay in fp32 8*H,
             the scan output and the gated norm's output 2 * 2*d_in (out_proj's input), with
             d_in = heads x head_dim. The Mamba-2 state: H*P*N fp32 per sequence and layer; the scan
             keeps one per chunk (L/chunk of them) while a layer runs, which the CUDA kernels
             (mamba_ssm) recompute in backward instead of storing: counted in the one-layer
             transient. Without those kernels (PyTorch's reference scan, and the exact packed scan
             of the CPU) every chunk also stores fp32 chunk x chunk decay and score matrices per
             head (about 3 * 4*H*chunk bytes per token): shown beside the plan, not in it.
method       DPO packs each pair's two answers into the same rows (no more tokens than SFT) and runs
             the reference (the adapters disabled) without gradients after the policy's forward,
             while its activations are kept: one decoder layer's activations on top. GRPO does the
             same for the G answers of each prompt, each of which fills at most one row, so a
             micro-batch holds up to batch_size x G rows (activations, logits and encoders scale by
             G); before that, generation keeps a KV cache for batch_size x G sequences of up to
             max_tokens tokens: 2 (K, V) x the K projection's width x 16-bit per token and
             attention layer (a hybrid's Mamba layers keep their state instead). Generation ends
             before the loss's forward starts, so the peak holds the larger of the two.
overhead     a fixed 1 GB for the CUDA context, cuBLAS workspaces and allocator slack.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.adapters import plan_roles
from finetune.deepspeed_presets import DEEPSPEED_PRESETS, deepspeed_stage, deepspeed_zero
from finetune.errors import MissingFileError
from finetune.families import family_for, get_family, model_types, registry
from finetune.families.base import ROLE_NAMES, HybridShape

GB = 1024 ** 3
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed NF4 + 8-bit absmax per 64 + fp32 per 256 blocks
OVERHEAD_BYTES = 1 * GB
OPTIM_BYTES = {"auto": 8, "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def shipped_configs() -> dict[str, str]:
    """`config:<name>` -> file in finetune/configs/: each family's `Family.shipped_configs`."""

    return {Path(f).stem: f for cls in registry().values() for f in cls.shipped_configs}


# ---- model geometry ------------------------------------------------------------------------
@dataclass
class Tower:
    """What the activation formula needs of a transformer stack."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    gated: bool  # SwiGLU MLP (gate/up/down) vs GELU MLP (fc1/fc2)

    def layer_bytes_per_token(self, seq: int = 0, eager: bool = False) -> float:
        h, i = self.hidden, self.intermediate
        mlp = 2 * h + (8 * i if self.gated else 4 * i)
        return 4 * h + 11 * h + mlp + (5 * self.heads * seq if eager else 0)


@dataclass
class ModelCount:
    """Per-role parameter counts of a model built on the meta device."""

    family: str
    config_path: str
    roles: dict[str, int]  # role -> parameters
    quantisable: dict[str, tuple[int, int]]  # role -> (weight params, output rows) of quantisable linears
    lora_shapes: dict[str, list[tuple[str, int, int]]]  # role -> [(module, in, out)] for all-linear candidates
    llm: Tower
    vision: Tower | None
    audio: Tower | None
    vocab: int
    patches_per_token: int  # vision-tower positions per image token
    frames_per_audio_token: int  # audio-tower positions per audio token
    #: MoE LLMs: fused expert weight path -> [experts, out, in], router module path -> its parameters
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    routers: dict[str, int] = field(default_factory=dict)
    #: hybrid LLMs (Mamba-2 / attention / MoE layers): the family's layer mix and sizes, else None
    hybrid: HybridShape | None = None
    #: the LLM's K projection width (kv heads x head dim; the KV cache's per-token size), 0 if unknown
    kv_dim: int = 0


def resolve_config(path: str, family: str = "auto", revision: str = "") -> tuple[str, Path]:
    """(family name, config.json path) of `model.path`: a folder, a hub id (its snapshot at `revision`
    in the HF cache), `tiny:<family>` or `config:<name>`."""

    if path.startswith("config:"):
        name = path.split(":", 1)[1]
        shipped = shipped_configs()
        if name not in shipped:
            raise MissingFileError(f"model.path {path!r}: no shipped config {name!r}; known: "
                                    + ", ".join(f"config:{n}" for n in shipped))
        cfg_path = CONFIG_DIR / shipped[name]
        mt = json.loads(cfg_path.read_text()).get("model_type")
        fam = family if family != "auto" else model_types()[mt]
        return get_family(fam).name, cfg_path
    try:
        fam = family_for(path, family, revision)
        folder = fam.resolve_path(path, revision=revision)
    except FileNotFoundError as e:
        raise MissingFileError(f"{e}; to plan without the weights use model.path="
                                + " or ".join(f"config:{n}" for n in shipped_configs())) from None
    return fam.name, Path(folder) / "config.json"


@functools.lru_cache(maxsize=16)
def _count_cached(family: str, cfg_path: str, mtime: float) -> tuple:
    from torch import nn


    fam = get_family(family)
    model, cfg = fam.meta_model(Path(cfg_path))
    roles: dict[str, int] = {}
    for name, p in model.named_parameters():
        r = fam.role_of(name)
        if r is not None:
            roles[r] = roles.get(r, 0) + p.numel()
    skip = list(fam.quant_skip)
    quantisable: dict[str, tuple[int, int]] = {}
    shapes: dict[str, list[tuple[str, int, int]]] = {}
    for name, mod in model.named_modules():
        r = fam.role_of(name)
        if r is None:
            continue
        if isinstance(mod, nn.Linear):
            shapes.setdefault(r, []).append((name, mod.in_features, mod.out_features))
            # bitsandbytes replaces every nn.Linear whose path holds none of the skip keys
            if not any(name == k or name.startswith(k + ".") or ("." + k) in name for k in skip):
                w, rows = quantisable.get(r, (0, 0))
                quantisable[r] = (w + mod.weight.numel(), rows + mod.out_features)
        elif isinstance(mod, nn.Embedding):
            shapes.setdefault(r, []).append((name, mod.num_embeddings, mod.embedding_dim))
    shapes_of = fam.tower_shapes(cfg)
    llm, vis, aud = (Tower(*stack) if stack else None for stack in (shapes_of.llm, shapes_of.vision, shapes_of.audio))
    # bitsandbytes quantises nn.Linear only: fused expert weights stay in the compute dtype under QLoRA
    experts = {n: tuple(p.shape) for n, p in model.named_parameters()
               if fam.expert_params and n.endswith(tuple("." + e for e in fam.expert_params))}
    routers = {n: sum(p.numel() for p in mod.parameters()) for n, mod in model.named_modules()
               if fam.router_modules and n.endswith(tuple("." + r for r in fam.router_modules))}
    kv_dim = next((o for n, _, o in shapes.get("llm", []) if n.endswith("k_proj")), 0)
    return model, ModelCount(family, cfg_path, roles, quantisable, shapes, llm, vis, aud, shapes_of.vocab,
                             shapes_of.patches_per_token, shapes_of.frames_per_audio_token, experts, routers,
                             shapes_of.hybrid, kv_dim)


def count_model(family: str, cfg_path: Path):
    """(meta model, ModelCount) for a config.json; cached per file."""
    cfg_path = Path(cfg_path).resolve()
    return _count_cached(family, str(cfg_path), cfg_path.stat().st_mtime)


# ---- the plan ------------------------------------------------------------------------------
@dataclass
class RoleLine:
    role: str
    mode: str
    params: int
    weight_bytes: float
    trainable: int
    state_bytes: float  # fp32 copy + fp32 grad + optimizer states (per GPU)


@dataclass
class Settings:
    """The recipe settings the arithmetic depends on (suggestions vary them)."""

    quantize: str
    weight_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    max_tokens: int
    batch_size: int
    gradient_checkpointing: bool
    optim: str
    eager: bool
    gpus: int
    strategy: str = "single"  # one of STRATEGIES
    method: str = "sft"  # train.method: dpo adds the reference pass, grpo the G answers and generation
    group: int = 1  # GRPO: answers per prompt


# how each strategy places the per-rank state: (state sharded, weights sharded, state offloaded, weights offloaded)
STRATEGIES = {
    "single": (False, False, False, False),
    "ddp": (False, False, False, False),
    "zero2": (True, False, False, False),
    "zero2-offload": (True, False, True, False),
    "zero3": (True, True, False, False),
    "zero3-offload": (True, True, True, True),
    "fsdp": (True, True, False, False),
}
TRAIN_SETTING = {"ddp": "train.distributed=ddp", "fsdp": "train.distributed=fsdp",
                 **{k: f"train.distributed=deepspeed train.deepspeed={k}" for k in STRATEGIES if k.startswith("zero")}}


def strategy_of(recipe, gpus: int) -> str:
    """The recipe's strategy as the planner names it (a DeepSpeed JSON by its stage and offloads)."""
    t = recipe.train
    if t.distributed == "fsdp":
        return "fsdp"
    if t.distributed == "deepspeed":
        if t.deepspeed in DEEPSPEED_PRESETS:
            return t.deepspeed
        stage = 3 if deepspeed_stage(t.deepspeed) == 3 else 2
        device = (deepspeed_zero(t.deepspeed).get("offload_optimizer") or {}).get("device", "none")
        offload = device not in ("none", None)
        return f"zero{stage}" + ("-offload" if offload else "")
    return "ddp" if gpus > 1 else "single"


@dataclass
class Plan:
    recipe: str
    family: str
    model_path: str
    config_path: str
    settings: Settings
    gpu_gb: float
    roles: list[RoleLine]
    weights: float
    trainable_params: int
    trainable_state: float
    activations_ckpt: float
    activations_full: float
    logits: float
    encoders: float
    overhead: float
    peak: float
    fits: bool
    host: float = 0.0  # bytes per rank in host memory (offload)
    experts_16bit: int = 0  # quantised runs: fused expert parameters left in the compute dtype
    gathered: float = 0.0  # weights unsharded at a time (ZeRO-3, FSDP)
    strategies: list = field(default_factory=list)  # (strategy, peak per GPU, host per rank, fits) on this GPU count
    suggestions: list[str] = field(default_factory=list)
    hybrid: HybridShape | None = None  # hybrid LLMs: the layer mix and Mamba-2 sizes (ModelCount.hybrid)
    mamba_reference: float = 0.0  # bytes the PyTorch reference scan would store on top (not in the peak)
    reference: float = 0.0  # DPO / GRPO: the reference's forward without gradients (one layer's activations)
    generation: float = 0.0  # GRPO: the KV cache of the sampled answers (not at the same time as the activations)

    @property
    def activations(self) -> float:
        """The activations of the recipe's own checkpointing setting."""
        return self.activations_ckpt if self.settings.gradient_checkpointing else self.activations_full


def _role_lines(count: ModelCount, rp, recipe, s: Settings) -> list[RoleLine]:
    shard_state, shard_weights, off_state, _ = STRATEGIES[s.strategy]
    # on the GPU: the gradient (4 B) and, unless offloaded, the fp32 copy and optimizer states
    per_param_state = 4 + (0 if off_state else 4 + OPTIM_BYTES.get(s.optim, 8))
    shard = max(1, s.gpus) if shard_state else 1
    wshard = max(1, s.gpus) if shard_weights else 1
    lines = []
    for role in ROLE_NAMES:
        n = count.roles.get(role, 0)
        if n == 0:
            continue
        mode = rp.modes.get(role, "frozen")
        wbytes = float(n * s.weight_bytes)
        if s.quantize in ("4bit", "8bit") and role in count.quantisable:
            qw, rows = count.quantisable[role]
            per = NF4_BYTES if s.quantize == "4bit" else 1.0
            extra = 0 if s.quantize == "4bit" else 4 * rows
            wbytes += qw * (per - s.weight_bytes) + extra
        trainable = 0
        if mode == "lora":
            r = getattr(recipe.roles, role).r
            shapes = {m: (i, o) for m, i, o in count.lora_shapes.get(role, [])}
            trainable = sum(r * (shapes[m][0] + shapes[m][1]) for m in rp.lora_targets.get(role, []))
            # LoRA on fused experts ([E, out, in]): rank r per expert, A [r*E, in] and B [out, r*E]
            trainable += sum(r * count.experts[p][0] * (count.experts[p][1] + count.experts[p][2])
                             for p in rp.lora_params.get(role, []))
            if role == "llm":
                trainable += sum(count.routers[m] for m in rp.routers)
        elif mode == "full":
            trainable = n
        lines.append(RoleLine(role, mode, n, wbytes / wshard, trainable, trainable * per_param_state / shard))
    return lines


def _activations(count: ModelCount, s: Settings, modes: dict) -> dict[str, float]:
    rows = s.batch_size * (s.group if s.method == "grpo" else 1)  # GRPO: each answer fills at most a row
    tokens = s.max_tokens * rows
    llm = count.llm
    if count.hybrid:
        kinds = hybrid_layer_bytes(count.hybrid, llm.hidden, llm.heads, s.max_tokens, s.eager)
        states = mamba_transient(count.hybrid, s.max_tokens) * rows
        full = sum(getattr(count.hybrid, k) * b for k, b in kinds.items()) * tokens + states
        per_layer = max(kinds.values()) * tokens + states
    else:
        per_layer = llm.layer_bytes_per_token(s.max_tokens, s.eager) * tokens
        full = llm.layers * per_layer
    ckpt = llm.layers * 2 * llm.hidden * tokens + per_layer
    logits = float(tokens) * count.vocab * 4

    def tower(t: Tower | None, items: int, roles: tuple[str, ...]) -> tuple[float, float]:
        """(stored for backward, transient) bytes of one encoder pass over `items` positions."""
        if t is None or items <= 0:
            return 0.0, 0.0
        one = t.layer_bytes_per_token(items, s.eager) * items
        trained = any(modes.get(r, "frozen") != "frozen" for r in roles)
        if not trained:
            return 0.0, one
        if s.gradient_checkpointing:
            return t.layers * 2 * t.hidden * items, one
        return t.layers * one, 0.0

    media_tokens = tokens  # rows of nothing but image (or audio) tokens
    v_store, v_tmp = tower(count.vision, count.patches_per_token * media_tokens, ("vision_encoder",))
    a_store, a_tmp = tower(count.audio, count.frames_per_audio_token * media_tokens, ("audio_encoder",))
    encoders = max(v_store, a_store) + max(v_tmp, a_tmp)
    reference = per_layer if s.method in ("dpo", "grpo") else 0.0  # the reference's forward, no gradients
    generation = 0.0
    if s.method == "grpo":
        attn_layers = count.hybrid.attention if count.hybrid else llm.layers
        per_token = 2 * (count.kv_dim or llm.hidden) * 2  # K and V, 16-bit
        generation = float(rows) * s.max_tokens * attn_layers * per_token
        if count.hybrid:
            generation += rows * count.hybrid.mamba * mamba_state_bytes(count.hybrid)
    return {"full": full, "ckpt": ckpt, "logits": logits, "encoders": encoders, "reference": reference,
            "generation": generation}


def hybrid_layer_bytes(hy: HybridShape, h: int, heads: int, seq: int = 0, eager: bool = False) -> dict[str, float]:
    """Stored activation bytes per token of each layer kind of a hybrid LLM (module docstring)."""
    a, d, kv = heads, hy.head_dim, hy.kv_heads
    d_in, gn, H = hy.mamba_heads * hy.mamba_head_dim, hy.groups * hy.state, hy.mamba_heads

    def mlp(i: int) -> int:  # relu^2: the up projection's output and the down projection's input
        return 2 * h + 4 * i

    return {
        "attention": 2 * h + 2 * h + 4 * a * d + 4 * kv * d + (5 * a * seq if eager else 0),
        "moe": 2 * h + 2 * h + 4 * hy.experts + hy.top_k * mlp(hy.moe_ffn) + mlp(hy.shared_ffn),
        "mlp": 2 * h + mlp(hy.mlp_ffn),
        "mamba": 2 * h + 2 * h + 2 * (2 * d_in + 2 * gn + H) + 2 * (d_in + 2 * gn) + 8 * H + 4 * d_in,
    }


def mamba_state_bytes(hy: HybridShape) -> int:
    """One Mamba-2 layer's recurrent state for one sequence: heads x head_dim x state, fp32."""
    return hy.mamba_heads * hy.mamba_head_dim * hy.state * 4


def mamba_transient(hy: HybridShape, seq: int) -> float:
    """The chunk states of one Mamba-2 layer's scan over a row of `seq` tokens (one per chunk, and
    the propagated copy), alive while the layer runs; 0 without Mamba layers."""
    if not hy.mamba:
        return 0.0
    return 2.0 * -(-seq // hy.chunk) * mamba_state_bytes(hy)


def mamba_reference_extra(hy: HybridShape, tokens: int, checkpointing: bool) -> float:
    """What PyTorch's reference chunked scan (no mamba_ssm kernels; the exact packed scan too) stores
    on top: per token and Mamba layer about three fp32 [heads, chunk] rows (decay, scores, their
    product) and the chunk states; with checkpointing for one layer at a time."""
    if not hy.mamba:
        return 0.0
    chunks = -(-tokens // hy.chunk)
    per_layer = tokens * 3 * 4 * hy.mamba_heads * hy.chunk + 2.0 * chunks * mamba_state_bytes(hy)
    return per_layer * (1 if checkpointing else hy.mamba)


def _estimate(count: ModelCount, rp, recipe, s: Settings, gpu_gb: float) -> dict:
    lines = _role_lines(count, rp, recipe, s)
    act = _activations(count, s, rp.modes)
    weights = sum(ln.weight_bytes for ln in lines)
    state = sum(ln.state_bytes for ln in lines)
    shard_state, shard_weights, off_state, off_weights = STRATEGIES[s.strategy]
    n = max(1, s.gpus)
    gathered = host = 0.0
    if shard_weights:
        # unsharded at a time: the decoder layer running and the one prefetched, or the
        # embedding / lm_head (each gathered whole at its use) when larger
        full = {ln.role: ln.weight_bytes * n for ln in lines}
        layer = full.get("llm", 0.0) / max(1, count.llm.layers)
        gathered = max(2 * layer, full.get("embeddings", 0.0), full.get("lm_head", 0.0))
    if off_state:  # fp32 copies and optimizer states of this rank's partition, in host memory
        host += sum(ln.trainable for ln in lines) * (4 + OPTIM_BYTES.get(s.optim, 8)) / (n if shard_state else 1)
    if off_weights:
        host += weights
        weights = 0.0
    used_act = act["ckpt"] if s.gradient_checkpointing else act["full"]
    # generation (GRPO) ends before the loss's forward: its cache and the activations are not alive together
    step = max(used_act + act["logits"] + act["encoders"] + act["reference"], act["generation"])
    peak = weights + gathered + state + step + OVERHEAD_BYTES
    return {"lines": lines, "weights": weights, "state": state, "act": act, "peak": peak, "host": host,
            "gathered": gathered, "fits": peak <= gpu_gb * GB}


def _settings(recipe, gpus: int) -> Settings:
    dtype = recipe.model.dtype
    if dtype == "auto":  # training loads in its precision; planning assumes a bf16-capable GPU
        dtype = {"fp32": "float32", "fp16": "float16"}.get(recipe.train.precision, "bfloat16")
    return Settings(
        quantize=recipe.model.quantize, weight_bytes=4 if dtype == "float32" else 2,
        max_tokens=recipe.data.max_tokens, batch_size=recipe.train.batch_size,
        gradient_checkpointing=bool(recipe.train.gradient_checkpointing), optim=recipe.train.optim,
        eager=recipe.model.attn == "eager", gpus=max(1, int(gpus)), strategy=strategy_of(recipe, int(gpus)),
        method=recipe.train.method, group=recipe.train.grpo_group if recipe.train.method == "grpo" else 1)


def plan(recipe, gpu_gb: float = 24, gpus: int = 1) -> Plan:
    """The memory plan of a recipe (a `Recipe`) on `gpus` GPUs of `gpu_gb` GiB each."""

    family, cfg_path = resolve_config(recipe.model.path, recipe.model.family, recipe.model.revision)
    model, count = count_model(family, cfg_path)
    rp = plan_roles(model, get_family(family), recipe)
    s = _settings(recipe, gpus)
    args = (count, rp, recipe)
    e = _estimate(*args, s, gpu_gb)
    out = Plan(
        recipe=recipe.name, family=family, model_path=recipe.model.path, config_path=str(cfg_path), settings=s,
        gpu_gb=gpu_gb, roles=e["lines"], weights=e["weights"],
        trainable_params=sum(ln.trainable for ln in e["lines"]), trainable_state=e["state"],
        activations_ckpt=e["act"]["ckpt"], activations_full=e["act"]["full"], logits=e["act"]["logits"],
        encoders=e["act"]["encoders"], overhead=OVERHEAD_BYTES, peak=e["peak"], fits=e["fits"], host=e["host"],
        gathered=e["gathered"], reference=e["act"]["reference"], generation=e["act"]["generation"],
        experts_16bit=sum(a * b * c for a, b, c in count.experts.values()) if s.quantize != "none" else 0,
        hybrid=count.hybrid)
    if count.hybrid:
        out.mamba_reference = mamba_reference_extra(count.hybrid, s.max_tokens * s.batch_size,
                                                    s.gradient_checkpointing)
    for name in STRATEGIES:
        if (name == "single") != (s.gpus == 1) and not name.startswith("zero"):
            continue  # one GPU: single or DeepSpeed (offload); several: no "single"
        st = _estimate(*args, replace(s, strategy=name), gpu_gb)
        out.strategies.append((name, st["peak"], st["host"], st["fits"]))
    if not out.fits:
        out.suggestions = _suggest(args, s, gpu_gb)
    return out


def _suggest(args, s: Settings, gpu_gb: float) -> list[str]:
    """Concrete changes, each with the peak it would give (alone, then combined)."""
    tries: list[tuple[str, Settings]] = []
    if not s.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing=true", replace(s, gradient_checkpointing=True)))
    if s.quantize == "none":
        tries.append(("model.quantize=4bit", replace(s, quantize="4bit")))
    if OPTIM_BYTES.get(s.optim, 8) > 2:
        tries.append(("train.optim=paged_adamw_8bit", replace(s, optim="paged_adamw_8bit")))
    if s.batch_size > 1:
        tries.append(("train.batch_size=1 (raise train.grad_accum to keep the effective batch)",
                      replace(s, batch_size=1)))
    out, combined, combo = [], s, []
    for text, st in tries:
        peak = _estimate(*args, st, gpu_gb)["peak"]
        out.append(f"{text}: peak {peak / GB:.1f} GB" + (" (fits)" if peak <= gpu_gb * GB else ""))
    # fewer tokens per row: the largest power-of-two budget that fits with the recipe's other settings
    mt = s.max_tokens // 2
    while mt >= 256:
        if _estimate(*args, replace(s, max_tokens=mt), gpu_gb)["fits"]:
            out.append(f"data.max_tokens={mt}: peak {_estimate(*args, replace(s, max_tokens=mt), gpu_gb)['peak'] / GB:.1f}"
                       " GB (fits; longer samples are then rejected or must be split)")
            break
        mt //= 2
    for text, st in tries:  # everything above together
        combo.append(text.split(" ")[0])
        combined = replace(combined, **{k: getattr(st, k) for k in ("gradient_checkpointing", "quantize", "optim",
                                                                      "batch_size") if getattr(st, k) != getattr(s, k)})
    if len(combo) > 1:
        peak = _estimate(*args, combined, gpu_gb)["peak"]
        out.append(f"all of {' '.join(combo)}: peak {peak / GB:.1f} GB" + (" (fits)" if peak <= gpu_gb * GB else ""))
    # the same GPU count under another strategy, then more GPUs: the first (least sharding) that fits
    found = False
    for n in sorted({s.gpus, 2, 4, 8}):
        if n < s.gpus or found:
            continue
        for name in ("ddp", "zero2", "fsdp", "zero3", "zero2-offload", "zero3-offload"):
            if (name == s.strategy and n == s.gpus) or (n == 1 and not name.startswith("zero")):
                continue
            peak = _estimate(*args, replace(s, gpus=n, strategy=name), gpu_gb)["peak"]
            if peak <= gpu_gb * GB:
                out.append(f"--gpus {n} with {TRAIN_SETTING[name]}: peak {peak / GB:.1f} GB per GPU (fits)")
                found = True
                break
    if not out:
        out.append("a GPU with more memory (--gpu), or fewer trained roles")
    return out


# ---- printing ------------------------------------------------------------------------------
def _n(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _gb(b: float) -> str:
    if 0 < b < 0.1 * GB:
        return f"{b / 1024 ** 2:.1f} MB"
    return f"{b / GB:.2f} GB"


def format_plan(p: Plan) -> str:
    s = p.settings
    wdt = {2: "bf16", 4: "fp32"}[s.weight_bytes]
    q = {"none": wdt, "4bit": f"LLM linears 4-bit NF4, rest {wdt}", "8bit": f"LLM linears 8-bit, rest {wdt}"}[s.quantize]
    lines = [
        f"memory plan: {p.recipe}  ({p.family}, {p.model_path}; config {p.config_path})",
        (f"  weights {q}; tokens/step {s.max_tokens} x {s.batch_size}"
         + (f" x {s.group} answers (GRPO)" if s.method == "grpo" else "")
         + (" (DPO: pairs packed in the rows)" if s.method == "dpo" else "") + "; gradient checkpointing "
         f"{'on' if s.gradient_checkpointing else 'off'}; optim {s.optim}; {s.gpus} x {p.gpu_gb:g} GB GPU; "
         f"strategy {s.strategy}"),
        "",
        f"{'role':<18}{'mode':<8}{'params':>10}{'weights':>12}{'trainable':>12}{'grad+optim':>13}",
    ]
    for r in p.roles:
        lines.append(f"{r.role:<18}{r.mode:<8}{_n(r.params):>10}{_gb(r.weight_bytes):>12}{_n(r.trainable):>12}"
                     f"{_gb(r.state_bytes):>13}")
    total = sum(r.params for r in p.roles)
    lines.append(f"{'all':<18}{'':<8}{_n(total):>10}{_gb(p.weights):>12}{_n(p.trainable_params):>12}"
                 f"{_gb(p.trainable_state):>13}")
    sharded, wsharded, off_state, off_weights = STRATEGIES[s.strategy]
    shard = f", sharded over {s.gpus} GPUs" if sharded and s.gpus > 1 else ""
    if off_state:
        shard += "; fp32 copy + optimizer in host memory"
    ck, nock = ("*", "") if s.gradient_checkpointing else ("", "*")
    rows = [
        ("weights", p.weights, f"sharded over {s.gpus} GPUs" if wsharded and s.gpus > 1 else
         "in host memory" if off_weights else ""),
        *([("weights gathered at a time", p.gathered, "two decoder layers, or the embedding / lm_head")]
          if wsharded else []),
        ("trainable state", p.trainable_state,
         f"fp32 copy + fp32 grad + {OPTIM_BYTES.get(s.optim, 8)} B optimizer per trainable param{shard}"),
        ("activations, checkpointing" + ck, p.activations_ckpt, "layer inputs + one layer"),
        ("activations, no checkpoint" + nock, p.activations_full, "all layers"),
        ("logits (fp32, for the loss)", p.logits, "tokens x vocab x 4; a chunked loss cuts it"),
        ("encoders (a row of media)", p.encoders, f"{s.max_tokens * s.batch_size * s.group} image or audio tokens "
                                                   "in one encoder call"),
        *([("reference forward (" + s.method.upper() + ")", p.reference,
            "one layer's activations, no gradients")] if p.reference else []),
        *([("generation cache (GRPO)", p.generation,
            f"KV of {s.batch_size} x {s.group} answers of <= {s.max_tokens} tokens; not beside the activations")]
          if p.generation else []),
        ("CUDA / runtime overhead", p.overhead, ""),
        ("expected peak", p.peak, "* = the recipe's setting"),
        *([("host memory per rank", p.host, "offloaded state")] if p.host else []),
    ]
    if p.experts_16bit:
        lines.append(f"  ({_n(p.experts_16bit)} fused expert weights stay {wdt}: bitsandbytes quantises "
                     "nn.Linear layers only)")
    if p.hybrid:
        hy = p.hybrid
        lines.append(f"  hybrid LLM: {hy.mamba} Mamba-2, {hy.attention} attention, {hy.moe} MoE"
                     + (f", {hy.mlp} MLP" if hy.mlp else "") + " layers; Mamba-2 state "
                     f"{hy.mamba_heads}x{hy.mamba_head_dim}x{hy.state} fp32 = {_gb(mamba_state_bytes(hy))} per "
                     f"sequence and layer, {_gb(mamba_transient(hy, s.max_tokens) * s.batch_size)} of chunk states "
                     "while a layer runs (counted)")
        if p.mamba_reference:
            lines.append(f"  without the mamba_ssm / causal_conv1d CUDA kernels the PyTorch reference scan stores "
                         f"{_gb(p.mamba_reference)} more (not counted: install them on CUDA)")
    lines.append("")
    lines += [f"  {label:<30}{_gb(b):>10}" + (f"   ({note})" if note else "") for label, b, note in rows]
    lines += [
        "",
        f"fits on {s.gpus} x {p.gpu_gb:g} GB: " + ("yes" if p.fits else "NO")
        + f" ({100 * p.peak / (p.gpu_gb * GB):.0f}% of one GPU)",
    ]
    if p.strategies:
        lines += ["", f"per GPU under each strategy on {s.gpus} x {p.gpu_gb:g} GB (the recipe's: {s.strategy}):",
                  f"  {'strategy':<16}{'peak/GPU':>10}{'host/rank':>11}  fits   set with"]
        for name, peak, host, fits in p.strategies:
            mark = "*" if name == s.strategy else " "
            lines.append(f" {mark}{name:<16}{peak / GB:>8.1f} GB{host / GB:>8.1f} GB  {'yes' if fits else 'NO ':<5}  "
                         f"{TRAIN_SETTING.get(name, '(one process)')}")
    if p.suggestions:
        lines.append("to make it fit, try:")
        lines += [f"  - {x}" for x in p.suggestions]
    lines.append("(estimates: see finetune/plan.py for the formulas; real peaks vary by a few GB with "
                 "kernels and fragmentation)")
    return "\n".join(lines)
