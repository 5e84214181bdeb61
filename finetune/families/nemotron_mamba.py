"""Exact packing for NemotronH's Mamba-2 mixers: convolution and scan restart at every sample.

A packed row holds several samples one after another. Attention keeps them apart with a
block-diagonal mask (or varlen boundaries); a Mamba-2 mixer has no mask to keep them apart: its
causal convolution (kernel 4) reads the last three tokens of the previous sample, and its chunked
scan carries the state h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t across the boundary. Both must
start from zero at each sample's first token, as they do for the sample alone.

What a sample's tokens are is `seq_idx` [rows, L] (int32): the index of each token's sample in its
row, the argument the CUDA kernels take (`causal_conv1d_fn(..., seq_idx=)`,
`mamba_chunk_scan_combined(..., seq_idx=)`), as transformers' own packed-sequence contract names it.
`install(model)` computes it once per forward (before the first layer, on the device, no host read)
from what the packed batch carries: `seq_idx` itself, else the collator's `cu_seq_lens_q`, else the
per-sample positions (`position_ids` restarting at 0), and hands it to every mixer.

Each mixer then runs transformers' own (non-fused) mixer arithmetic with the two steps that mix
tokens made boundary-aware:

- on CUDA with `causal_conv1d` / `mamba_ssm` installed, their kernels with `seq_idx` (through
  transformers' own wrappers of them, which also pick Hub kernels when loaded with them);
- elsewhere (the CPU, a GPU without those packages), `causal_conv1d_packed` and
  `chunk_scan_packed` below: the same chunked algorithm as transformers' reference scan, with every
  term that would cross a boundary masked out (within a chunk, into a chunk's final state, from one
  chunk's state into the next and into the outputs). Exact in fp32 against each sample alone
  (tests/test_nemotron_omni_family.py), for boundaries inside chunks and on chunk edges.

Without packing information (padded batches, generation, a cache) the mixer is transformers' own.
The fused training kernel (`mamba_split_conv1d_scan_combined`) is not used: it reads
`out_proj.weight` directly, which would skip a LoRA adapter on out_proj.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
import torch.nn.functional as F

#: devices on which installed CUDA kernels (causal_conv1d, mamba_ssm) are used for packed rows; tests
#: stub the kernels and add "cpu" to check that they receive the boundaries
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)


def kernel_for(device: torch.device, package: str) -> bool:
    """Whether packed rows on `device` go to `package`'s kernel (installed, and a kernel device)."""
    return device.type in KERNEL_DEVICES and installed(package)


@functools.lru_cache(maxsize=None)
def installed(package: str) -> bool:
    """Whether `package` can be imported: decided once per process, as transformers decides its
    kernels once, when it imports the model's module."""
    return importlib.util.find_spec(package) is not None


# ---- boundaries -----------------------------------------------------------------------------
def seq_idx_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] sample index of every token of packed rows whose positions restart at 0 for each
    sample (tokens before a row's first 0 belong to sample 0). Device ops only."""
    if position_ids.dim() == 3:  # [rows of positions, R, L]: the first is the per-sample text row
        position_ids = position_ids[0]
    starts = (position_ids == 0).to(torch.int32)
    return (torch.cumsum(starts, dim=-1, dtype=torch.int32) - starts[..., :1]).to(torch.int32)


def seq_idx_from_cu(cu: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """[rows, L] sample index from the flat boundaries `cu` of rows x L tokens (varlen layout)."""
    flat = torch.arange(rows * length, device=cu.device)
    seg = torch.searchsorted(cu[1:].to(flat.device, torch.long), flat, right=True).view(rows, length)
    first = seg[:, :1]
    return (seg - first).to(torch.int32)


# ---- the exact CPU path ---------------------------------------------------------------------
def causal_conv1d_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor,
                         activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal convolution over [B, L, C] with no tap crossing a sample boundary: the
    output at t sums w[k] * x[t - K + 1 + k] over the taps of t's own sample (as the sample alone,
    left-padded with zeros, would)."""
    K = weight.shape[-1]
    L = x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))
    sp = F.pad(seq_idx, (K - 1, 0), value=-1)
    out = None
    for k in range(K):
        tap = xp[:, k:k + L] * (sp[:, k:k + L] == seq_idx)[..., None].to(x.dtype)
        term = tap * weight[:, k].to(x.dtype)
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(x.dtype)
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal_conv1d_packed: activation {activation!r}")
    return out


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: sum of x over (j, i] at [i, j] for j <= i, -inf above the diagonal
    (cumulative sums of masked copies, not differences: exact for long chunks)."""
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    s = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    return s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), -torch.inf)


def chunk_scan_packed(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      chunk_size: int, seq_idx: torch.Tensor, *, D: torch.Tensor | None = None,
                      dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                      dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """Mamba-2's chunked scan (SSD) over [B, L, H, P] with the state restarted at every sample.

    The algorithm and its float32 arithmetic are transformers' reference scan (intra-chunk
    "attention" L * (C B^T), chunk states, the inter-chunk recurrence, the states' contribution to
    the outputs); each of the four terms is masked where it would carry from one sample into the
    next: token s feeds token l only within a sample, a token feeds its chunk's final state only if
    it is of the sample that ends the chunk, a chunk's final state feeds a later chunk only through
    one sample, and a chunk's incoming state feeds its tokens only of that same sample."""
    b, L, H, P = x.shape
    G = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    B = B.float().repeat_interleave(H // G, dim=2, output_size=H)
    C = C.float().repeat_interleave(H // G, dim=2, output_size=H)
    pad = (chunk_size - L % chunk_size) % chunk_size
    D_res = D[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad)) if D is not None else None
    x = x * dt[..., None].float()
    Adt = A.to(x.dtype) * dt.float()  # [b, L, H]
    # padding: no input, no decay, of the row's last sample (its outputs are cut off)
    seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1) if pad else seq_idx

    def chunks(t):
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    x, Adt, B, C = (chunks(t) for t in (x, Adt, B, C))  # x [b,c,l,h,p], Adt [b,c,l,h], B/C [b,c,l,h,n]
    seq = seq.reshape(b, -1, chunk_size)  # [b, c, l]
    Adt = Adt.permute(0, 3, 1, 2)  # [b, h, c, l]
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. within a chunk: token s feeds token l >= s of its own sample
    same = (seq[..., :, None] == seq[..., None, :])  # [b, c, l, s]
    Lmat = torch.exp(_segsum(Adt)) * same[:, None].to(x.dtype)  # [b, h, c, l, s]
    G_ = torch.einsum("bclhn,bcshn->bclsh", C, B)
    Y_diag = torch.einsum("bclsh,bcshp->bclhp", G_ * Lmat.permute(0, 2, 3, 4, 1), x)

    # 2. each chunk's final state, from the tokens of the sample that ends the chunk
    last = seq[..., -1:]  # [b, c, 1]
    into_end = (seq == last).to(x.dtype)  # [b, c, l]
    decay = torch.exp(A_cum[..., -1:] - A_cum) * into_end[:, None]  # [b, h, c, l]
    states = torch.einsum("bclhn,bclhp->bchpn", B * decay.permute(0, 2, 3, 1)[..., None], x)

    # 3. chunk to chunk: a final state reaches a later chunk's end only within one sample
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # [b, c+1, h, p, n]; 0: no initial state
    ends = torch.cat([torch.full_like(last[:, :1, 0], -1), last[..., 0]], dim=1)  # [b, c+1]
    same_end = (ends[:, :, None] == ends[:, None, :]).to(x.dtype)  # [b, z', z]
    decay_chunk = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0)))) * same_end[:, None]  # [b, h, z', z]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    carried = new_states[:, :-1]  # [b, c, h, p, n]: the state entering each chunk

    # 4. the incoming state feeds the chunk's tokens of the sample it belongs to
    from_prev = (seq == ends[:, :-1, None]).to(x.dtype)  # [b, c, l]
    out_decay = torch.exp(A_cum).permute(0, 2, 3, 1) * from_prev[..., None]  # [b, c, l, h]
    Y_off = torch.einsum("bclhn,bchpn->bclhp", C, carried) * out_decay[..., None]

    y = (Y_diag + Y_off).reshape(b, -1, H, P)
    if D_res is not None:
        y = y + D_res
    return y[:, :L]


# ---- the mixer ------------------------------------------------------------------------------
def mixer_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, seq_idx=None, **kwargs):
    """NemotronHMamba2Mixer.forward for training rows (no cache): transformers' own non-fused
    arithmetic, with the convolution and the scan restarted at every sample of `seq_idx` (module
    docstring). With a cache (generation) it is transformers' forward unchanged."""
    if cache is not None:
        return type(self).forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    from transformers.models.nemotron_h import modeling_nemotron_h as M

    b, L, _ = hidden_states.shape
    dtype = hidden_states.dtype
    hidden_states = M.apply_mask_to_padding_states(hidden_states, attention_mask)
    projected = self.in_proj(hidden_states)
    A = -torch.exp(self.A_log.float())
    gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    weight = self.conv1d.weight.squeeze(1)
    packed = seq_idx is not None
    if not packed or kernel_for(xBC.device, "causal_conv1d"):
        extra = {"seq_idx": seq_idx} if packed else {}
        xBC = M.causal_conv1d_fn(xBC.transpose(1, 2), weight, self.conv1d.bias, activation=self.activation,
                                 **extra).transpose(1, 2)
    else:
        xBC = causal_conv1d_packed(xBC, weight, self.conv1d.bias, seq_idx, self.activation)
    xBC = M.apply_mask_to_padding_states(xBC, attention_mask)
    n = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xBC, [self.intermediate_size, n, n], dim=-1)
    args = (x.view(b, L, self.num_heads, self.head_dim), dt, A, B.view(b, L, self.n_groups, self.ssm_state_size),
            C.view(b, L, self.n_groups, self.ssm_state_size))
    common = dict(D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.time_step_limit)
    if not packed or kernel_for(x.device, "mamba_ssm"):
        extra = {"seq_idx": seq_idx} if packed else {}
        y = M.mamba2_chunk_scan(*args, chunk_size=self.chunk_size, z=None, **common, **extra)
    else:
        y = chunk_scan_packed(*args, self.chunk_size, seq_idx, **common)
    y = self.norm(y.reshape(b, L, -1), gate)
    return self.out_proj(y.to(dtype))


def model_pre_hook(module, args, kwargs):
    """NemotronHModel's forward pre-hook: the packed rows' `seq_idx` for every mixer, once per
    forward, from the batch's own seq_idx, its cu_seq_lens_q, or its restarting positions; nothing
    for padded batches (an attention mask), single rows without positions, or a cache."""
    if kwargs.get("seq_idx") is not None:
        return args, kwargs
    if kwargs.get("attention_mask") is not None or kwargs.get("cache") is not None \
            or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return args, kwargs
    embeds = kwargs.get("inputs_embeds")
    ids = kwargs.get("input_ids")
    ref = embeds if embeds is not None else ids
    if ref is None:
        return args, kwargs
    rows, length = ref.shape[0], ref.shape[1]
    if length < 2:
        return args, kwargs
    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if cu is not None:
        kwargs["seq_idx"] = seq_idx_from_cu(cu, rows, length)
    elif pos is not None:
        pos = pos.reshape(-1, rows, length)[0] if pos.dim() == 3 else pos.reshape(-1, length)
        if pos.shape[0] != rows:
            pos = pos.expand(rows, -1)
        kwargs["seq_idx"] = seq_idx_from_positions(pos)
    return args, kwargs


def install(model: torch.nn.Module, *, packed: bool = True) -> int:
    """Make every Mamba-2 mixer of `model` reset at sample boundaries (module docstring): instance
    attributes and a forward pre-hook only (weights and module names unchanged). Idempotent;
    returns the number of mixers. `packed=False` installs the mixers' forward without the hook (no
    boundaries are ever derived: the control of the packing tests)."""
    n = 0
    for name, mod in model.named_modules():
        if type(mod).__name__ == "NemotronHMamba2Mixer":
            if not isinstance(vars(mod).get("forward"), types.MethodType):
                mod.forward = types.MethodType(mixer_forward, mod)
            n += 1
        elif type(mod).__name__ == "NemotronHModel" and packed and not getattr(mod, "_packed_seq_idx", False):
            mod.register_forward_pre_hook(model_pre_hook, with_kwargs=True)
            mod._packed_seq_idx = True
    return n
