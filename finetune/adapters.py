"""Per-role trainability: each role `frozen`, `lora` or `full`; LoRA settings per role.

LoRA adapters and fully trained modules both go through one PEFT config, so the adapter
folder is a standard PEFT folder (`PeftModel.from_pretrained` loads it) and
`merge_and_unload` gives the merged model: LoRA targets are listed by their full module
path, per-role rank/alpha go in PEFT's rank/alpha patterns, and `full` roles become
`modules_to_save` at the shallowest non-container modules that lie wholly inside the role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.families.base import ROLE_NAMES, Family


@dataclass
class RolePlan:
    """What `plan_roles` decided for one model: LoRA targets and full-trained modules."""

    lora_targets: dict[str, list[str]] = field(default_factory=dict)  # role -> module paths
    full_modules: dict[str, list[str]] = field(default_factory=dict)  # role -> module paths
    modes: dict[str, str] = field(default_factory=dict)
    #: role -> parameter paths of fused MoE expert weights with LoRA (PEFT's target_parameters)
    lora_params: dict[str, list[str]] = field(default_factory=dict)
    routers: list[str] = field(default_factory=list)  # MoE router modules trained in full

    @property
    def all_lora(self) -> list[str]:
        return [m for mods in self.lora_targets.values() for m in mods]

    @property
    def all_lora_params(self) -> list[str]:
        return [p for ps in self.lora_params.values() for p in ps]

    @property
    def trains_routing(self) -> bool:
        """Experts or routers train: the load-balancing loss then joins the loss."""
        return bool(self.all_lora_params or self.routers)

    @property
    def all_full(self) -> list[str]:
        return [m for mods in self.full_modules.values() for m in mods] + self.routers


def _is_linear(mod: nn.Module) -> bool:
    """A linear layer for LoRA: nn.Linear (also 4/8-bit), or a pointwise convolution (1x1, stride 1,
    no padding, one group: a linear layer applied at every position, what a CNN tower such as
    Gemma 3n's MobileNetV5 has in place of linear layers)."""
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, nn.Conv2d):
        return (mod.kernel_size == (1, 1) and mod.stride == (1, 1) and mod.groups == 1
                and mod.padding in ((0, 0), "valid") and mod.dilation == (1, 1))
    name = type(mod).__name__
    return name in ("Linear4bit", "Linear8bitLt")


def plan_roles(model: nn.Module, family: Family, recipe) -> RolePlan:
    """Decide, from the recipe's roles, which modules get LoRA and which are trained fully."""
    plan = RolePlan()
    present = set(family.present_roles(model))
    for role in ROLE_NAMES:
        spec = getattr(recipe.roles, role)
        if role not in present:
            if spec.mode != "frozen":
                raise ConfigError(f"roles.{role}.mode is {spec.mode!r} but this {family.name} model has no "
                                 f"{role}; set roles.{role}.mode: frozen")
            continue
        plan.modes[role] = spec.mode
        if spec.experts != "frozen" or spec.router != "frozen":
            _plan_moe(model, family, role, spec, plan)
        if spec.mode == "lora":
            plan.lora_targets[role] = _lora_targets(model, family, role, spec.targets)
            if not plan.lora_targets[role]:
                raise ConfigError(f"roles.{role}.targets {spec.targets!r} matches no linear or embedding layer "
                                 f"in {role}; use 'all-linear' or module names such as q_proj, v_proj")
        elif spec.mode == "full":
            plan.full_modules[role] = _cover(model, family, role)
    return plan


def _plan_moe(model: nn.Module, family: Family, role: str, spec, plan: RolePlan) -> None:
    """roles.<role>.experts: lora -> the fused expert weights in plan.lora_params; router: full ->
    the router modules in plan.routers (trained in full, as modules_to_save)."""
    if not family.expert_params:
        raise ConfigError(f"roles.{role}.experts / roles.{role}.router: this {family.name} model's LLM is dense "
                         f"(no experts or routers); set both to frozen")
    if spec.experts == "lora":
        plan.lora_params[role] = [f"{n}.{leaf}" for n, mod in model.named_modules() if family.role_of(n) == role
                                  for leaf, _ in mod.named_parameters(recurse=False)
                                  if f"{n}.{leaf}".endswith(tuple("." + e for e in family.expert_params))]
    if spec.router == "full":
        plan.routers = [n for n, _ in model.named_modules() if family.role_of(n) == role
                        and n.endswith(tuple("." + r for r in family.router_modules))]


def _lora_targets(model: nn.Module, family: Family, role: str, targets) -> list[str]:
    names = []
    for name, mod in model.named_modules():
        if family.role_of(name) != role:
            continue
        ok = _is_linear(mod) or (role == "embeddings" and isinstance(mod, nn.Embedding))
        if not ok:
            continue
        if targets != "all-linear":
            leaf = name.rsplit(".", 1)[-1]
            if not any(leaf == t or name.endswith("." + t) for t in targets):
                continue
        names.append(name)
    return names


def _cover(model: nn.Module, family: Family, role: str) -> list[str]:
    """The shallowest modules whose parameters all belong to `role` (no ModuleList/Dict)."""
    out: list[str] = []

    def roles_in(mod: nn.Module, prefix: str) -> set:
        return {family.role_of(f"{prefix}.{n}" if prefix else n) for n, _ in mod.named_parameters()}

    def visit(mod: nn.Module, prefix: str):
        rs = roles_in(mod, prefix)
        if not rs or role not in rs:
            return
        if rs == {role} and prefix and not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            out.append(prefix)
            return
        direct = [n for n, _ in mod.named_parameters(recurse=False)]
        if any(family.role_of(f"{prefix}.{n}" if prefix else n) == role for n in direct):
            raise ConfigError(f"cannot train {role} fully: {prefix} holds parameters of several roles")
        for n, child in mod.named_children():
            visit(child, f"{prefix}.{n}" if prefix else n)

    visit(model, "")
    return out


def apply_roles(model: nn.Module, family: Family, recipe, *, gradient_checkpointing: bool = False):
    """Freeze, attach LoRA and unfreeze full roles as the recipe says; returns (model, plan).

    The returned model is a `PeftModel`. Quantised models must have been loaded with the LLM's
    linear layers in 4/8-bit already (see `Family.load`).
    """
    from peft import LoraConfig, get_peft_model

    plan = plan_roles(model, family, recipe)
    for p in model.parameters():
        p.requires_grad_(False)
    if not plan.all_lora and not plan.all_full:
        raise ConfigError("every role is frozen: set at least one role to lora or full")
    carrier = None
    if not plan.all_lora and not plan.all_lora_params:
        # full roles only (a projector alignment stage): PEFT needs one LoRA target, so one frozen
        # linear layer carries a rank-1 pair that never trains; its B starts at zero, so it adds
        # exactly nothing to the forward or to the merged weights
        carrier = _carrier(model, family, plan)
        plan.lora_targets = {family.role_of(carrier): [carrier]}
    first = next(r for r in ROLE_NAMES if r in plan.lora_targets)
    base = getattr(recipe.roles, first)
    rank_pattern, alpha_pattern = {}, {}
    for role, mods in plan.lora_targets.items():
        spec = getattr(recipe.roles, role)
        for m in mods + [p.rsplit(".", 1)[0] for p in plan.lora_params.get(role, [])]:
            if spec.r != base.r:
                rank_pattern[f"^{re.escape(m)}$"] = spec.r
            if spec.alpha != base.alpha:
                alpha_pattern[f"^{re.escape(m)}$"] = spec.alpha
    for role, mods in plan.lora_targets.items():
        tied = [m for m in mods if _shares_weights(model, [m])]
        if tied:
            # the adapter would change one use of the shared matrix, the merge both
            raise ConfigError(f"roles.{role}.mode: lora on {', '.join(tied[:3])}, whose weight another module "
                             "shares (an output layer tied to the input embedding), cannot be merged exactly; "
                             f"set roles.{role}.mode: full (trains the one matrix for both uses) or frozen")
    tie = {}
    if _shares_weights(model, plan.all_full):
        # a trained module whose weight another module shares (an output layer tied to the input
        # embedding): PEFT gives the tied twin the same trained copy, so both uses train together
        # and the merge keeps one matrix (without it the twin kept the frozen original)
        tie = {"ensure_weight_tying": True}
    config = LoraConfig(
        r=1 if carrier else base.r, lora_alpha=1 if carrier else base.alpha, lora_dropout=0.0 if carrier else base.dropout,
        target_modules=plan.all_lora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        modules_to_save=plan.all_full or None, bias="none",
        # fused MoE experts ([experts, out, in] parameters): LoRA of rank r per expert
        target_parameters=plan.all_lora_params or None, **tie,
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        drop_input_require_grads_hooks(peft_model)
    if carrier:
        plan.lora_targets = {}
        for name, p in peft_model.named_parameters():
            if "lora_" in name and f"{carrier}." in name:
                p.requires_grad_(False)
    # Per-role dropout: PEFT's config holds one value; dropout does not change merged weights.
    for name, mod in peft_model.named_modules():
        drop = getattr(mod, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and "default" in drop:
            role = family.role_of(name)
            p = getattr(recipe.roles, role).dropout if role else base.dropout
            drop["default"] = nn.Dropout(p) if p > 0 else nn.Identity()
    return peft_model, plan


def _carrier(model: nn.Module, family: Family, plan: RolePlan) -> str:
    """A frozen linear layer outside every trained module, for PEFT's one required LoRA target."""
    trained = tuple(f"{m}." for m in plan.all_full)
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) and family.role_of(name + ".weight") and name + "." not in trained
                and not any(name.startswith(t) for t in trained) and not _shares_weights(model, [name])):
            return name
    raise ConfigError("no frozen linear layer to carry PEFT's required LoRA target; train one role with lora")


def _shares_weights(model: nn.Module, names: list[str]) -> bool:
    """Whether a parameter of one of the modules `names` (or inside them) is also another module's."""
    owners: dict[int, set[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    for n in names:
        for p in model.get_submodule(n).parameters():
            if len(owners.get(id(p), ())) > 1:
                return True
    return False


def drop_input_require_grads_hooks(model: nn.Module) -> int:
    """Remove the hooks that make input embeddings' outputs require grad; returns how many.

    transformers' checkpointing switch and PEFT both add them (what reentrant checkpointing needs)
    to every sub-model's input embedding: the vision tower's patch embedding and the audio
    tower's first convolution too, so a frozen tower built an autograd graph and ran a second
    time in backward, for nothing. Non-reentrant checkpointing (ours) needs none of them. The
    second registration replaces the first's handles, so they are found by their function."""
    n = 0
    for mod in model.modules():
        for key, hook in list(mod._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del mod._forward_hooks[key]
                n += 1
    return n


def fp32_trainable(model: nn.Module) -> int:
    """Keep every trainable parameter in float32 under 16-bit mixed precision; returns how many.

    The frozen base stays 16-bit and autocast runs the matmuls in 16-bit; the trained weights
    (LoRA, which PEFT already keeps in fp32, and the `full` roles' copies) are the master weights
    the optimizer updates. In fp16 an AdamW update on fp16 weights breaks at once (the tiny
    model's loss went NaN at step 2); in bf16 updates below 2^-8 of a weight are rounded away.
    The planner counts these fp32 copies (see finetune/plan.py).
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            n += p.numel()
    return n


def param_count(p: torch.Tensor) -> int:
    """Element count of a parameter, counting 4-bit packed weights by their real shape and
    ZeRO-3-partitioned ones (an empty local tensor) by their full one."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def role_table(model: nn.Module, family: Family, plan: RolePlan | None = None) -> list[dict]:
    """Per role: mode, trainable parameters (LoRA and full copies) and total base parameters."""
    rows = {r: {"role": r, "mode": (plan.modes.get(r, "frozen") if plan else "frozen"),
                "trainable": 0, "total": 0, "dtype": set()} for r in ROLE_NAMES}
    for name, p in model.named_parameters():
        role = family.role_of(name)
        if role is None:
            continue
        row = rows[role]
        is_adapter = ".lora_" in name or ".modules_to_save." in name
        if p.requires_grad:
            row["trainable"] += param_count(p)
        if not is_adapter:
            row["total"] += param_count(p)
            row["dtype"].add("4bit" if getattr(p, "quant_state", None) is not None
                             else str(p.dtype).replace("torch.", ""))
    out = []
    for r in ROLE_NAMES:
        row = rows[r]
        if row["total"] == 0:
            continue
        row["dtype"] = "/".join(sorted(row["dtype"]))
        out.append(row)
    return out


def format_role_table(rows: list[dict]) -> str:
    """The start-of-run table: role, mode, trainable and total parameters, dtype."""
    def fmt(n: int) -> str:
        for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= div:
                return f"{n / div:.2f}{unit}"
        return str(n)

    lines = [f"{'role':<18}{'mode':<8}{'trainable':>12}{'total':>12}  dtype"]
    tt = tot = 0
    for r in rows:
        lines.append(f"{r['role']:<18}{r['mode']:<8}{fmt(r['trainable']):>12}{fmt(r['total']):>12}  {r['dtype']}")
        tt += r["trainable"]
        tot += r["total"]
    lines.append(f"{'all':<18}{'':<8}{fmt(tt):>12}{fmt(tot):>12}  ({100 * tt / max(tot, 1):.2f}% trainable)")
    return "\n".join(lines)


def role_param_groups(model: nn.Module, family: Family, recipe, weight_decay: float) -> list[dict]:
    """Optimizer groups with each role's learning rate (role lr, else train.lr)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = family.role_of(name)
        lr = getattr(recipe.roles, role).lr if role else None
        lr = lr if lr is not None else recipe.train.lr
        decay = weight_decay if p.ndim >= 2 else 0.0
        key = (lr, decay)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": decay})["params"].append(p)
    return list(groups.values())
