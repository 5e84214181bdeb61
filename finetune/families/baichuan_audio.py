"""Baichuan-Omni-1.5's audio tokenizer: log-mel features, Whisper-style encoder, residual-VQ bridge.

Baichuan-Omni-1.5 does not feed continuous audio embeddings to its language model. A clip is cut
into 30 s segments; each segment becomes a 128-bin log-mel spectrogram (100 frames/s), a
Whisper-large-v3-shaped encoder turns it into 50 frames/s, and a gated convolutional pooler
groups 4 frames into one vector that an 8-stage residual vector quantiser turns into 8 integer
codes. Each group of 4 encoder frames (80 ms) is one `<audio_pad_baichuan>` position in the
prompt; the LLM's trainable `audio_embed_layers` (not in this module) embed the 8 codes and sum
them. So a clip contributes 12.5 tokens per second.

The modules here are **always frozen** during fine-tuning: the reference model computes the
codes under `torch.no_grad()` with the tokenizer in eval mode, so no gradient ever reaches the
encoder, the pooler or the codebooks. Because nothing downstream depends on their gradients,
codes can be computed once per clip and cached (features are deterministic here; see below).

Parameter and buffer names follow the released checkpoint exactly (under the prefix
`audio_tokenizer.`), so `AudioTokenizer.load_state_dict` accepts the checkpoint's tensors after
stripping that prefix.

Left out on purpose:
- The decoder side (the audio decoder, flow matching and vocoder used for speech *output*);
  only `proj_decoder` exists, so that the checkpoint loads without unexpected keys.
- SpecAugment. The reference processor can mask random time spans of the mel when built for
  training; that is a training-time augmentation that changes the codes and prevents caching,
  and it is out of scope. `audio_features` always returns un-augmented features.
- The reference's external attention kernels and ZeRO hints. Attention here is PyTorch's
  scaled-dot-product attention applied per sample, which computes the same thing as the
  reference's variable-length kernel.

One deliberate difference: the reference runs the first convolution over the zero-padded batch,
so for a segment whose mel length is odd, the last encoder frame sees the first convolution's
output on a padding frame (bias plus a partial window) instead of zero, and its codes can depend
on which longer segments share the batch. `AudioEncoder.forward` accepts `mel_length` to zero
those frames, and `AudioTokenizer.encode` always passes it, so a segment's codes are those the
reference computes for that segment alone (batch size 1), whatever else is in the batch.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.kernels import varlen

SAMPLE_RATE = 16000          # Hz; everything below assumes 16 kHz mono input
SEGMENT_SAMPLES = 480000     # 30 s: the longest segment the encoder sees
N_FFT = 400                  # 25 ms window; segments shorter than this are dropped
HOP_LENGTH = 160             # 10 ms hop: 100 mel frames per second
MAX_MEL_FRAMES = 3000        # mel frames of a full 30 s segment
N_MELS = 128
AVG_POOLER = 4               # encoder frames per LLM audio token in the released model


# --------------------------------------------------------------------------------------------
# Lengths and token counts (no model needed)
# --------------------------------------------------------------------------------------------

def resampled_length(n_orig: int, orig_sr: int) -> int:
    """Number of samples after resampling `n_orig` samples at `orig_sr` Hz to 16 kHz.

    This is ceil(n_orig * 16000 / orig_sr), the output length of the reference's resampler.
    """
    if orig_sr <= 0:
        raise ValueError(f"sampling rate must be positive, got {orig_sr}")
    return -(-int(n_orig) * SAMPLE_RATE // int(orig_sr))


def segment_lengths(n_samples: int) -> list[int]:
    """Split a 16 kHz clip of `n_samples` into the encoder's segments; returns their lengths.

    Consecutive, non-overlapping 30 s chunks (480000 samples); the last holds the remainder.
    Chunks shorter than one FFT window (400 samples) are dropped, which can leave no segment.
    """
    n = int(n_samples)
    if n < 0:
        raise ValueError(f"n_samples must be >= 0, got {n}")
    lengths = [min(SEGMENT_SAMPLES, n - start) for start in range(0, n, SEGMENT_SAMPLES)]
    return [length for length in lengths if length >= N_FFT]


def _mel_frames(n: int) -> int:
    """Valid mel frames of a segment of `n` samples (centred STFT, capped at 30 s)."""
    return min(MAX_MEL_FRAMES, n // HOP_LENGTH + 1)


def _encoder_frames(mel_frames: int) -> int:
    """Encoder output frames for `mel_frames` input frames (conv k3 s1 p1, then k3 s2 p1)."""
    return (mel_frames - 1) // 2 + 1


def segment_tokens(n: int) -> int:
    """LLM audio tokens of one segment of `n` samples: floor(encoder frames / 4).

    The trailing 1-3 encoder frames that do not fill a group of 4 are discarded. A result of 0
    (segments under 960 samples, i.e. 60 ms) means the segment is skipped entirely.
    """
    return _encoder_frames(_mel_frames(int(n))) // AVG_POOLER


def audio_token_count(n_samples: int) -> int:
    """`<audio_pad_baichuan>` positions for a 16 kHz clip of `n_samples` (all its segments).

    The prompt wraps them in a single start/end token pair, whatever the number of segments.
    Examples: 0.1 s -> 1, 1 s -> 12, 5 s -> 62, 30 s -> 375, 31 s -> 387, 60 s -> 750.
    """
    return sum(segment_tokens(n) for n in segment_lengths(n_samples))


# --------------------------------------------------------------------------------------------
# Log-mel features
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _mel_filters_np() -> np.ndarray:
    """The (128, 201) Slaney-style mel filterbank of Whisper v3, as float64."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return np.ascontiguousarray(np.asarray(fb, dtype=np.float64).T)


def audio_features(wave: np.ndarray, compute_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Log-mel features of a 16 kHz mono clip, one float32 tensor (128, valid) per kept segment.

    For each segment of n samples (see `segment_lengths`), with valid = min(3000, n//160 + 1):
    the waveform is zero-padded (or cut) to exactly 480000 samples *before* the STFT, so the last
    valid frames see zeros rather than a reflection; a centred STFT (n_fft 400, hop 160,
    periodic Hann window, reflect padding at the two ends) gives 3001 frames, the last of which
    is dropped; power spectra go through the Slaney mel filterbank (128 bins, 0-8000 Hz);
    log10 with a 1e-10 floor; values are raised to at least (max - 8), the max taken over the
    whole padded 3000-frame spectrogram; then (x + 4) / 4; finally trimmed to `valid` frames.
    Segments that would yield no LLM token (`segment_tokens(n) == 0`) are skipped.

    There is no waveform normalisation and no SpecAugment (training-time time masking is out of
    scope): the output is a deterministic function of the waveform.

    `compute_dtype` is the precision of the STFT and mel arithmetic. float32 (the default) is
    what the reference processor does and matches transformers' WhisperFeatureExtractor
    bit-for-bit on CPU; float64 gives values closer to exact arithmetic (they differ from the
    float32 ones by about 1e-5 near the dynamic-range floor).
    """
    w = torch.as_tensor(np.asarray(wave))
    if w.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (n,), got {tuple(w.shape)}")
    if not torch.is_floating_point(w):
        raise TypeError(f"expected a floating-point waveform, got {w.dtype}")
    w = w.to(torch.float32)

    starts, valids = [], []
    for i, n in enumerate(segment_lengths(w.shape[0])):
        # segment_lengths drops only a short *last* chunk, so segment i starts at i * 30 s.
        if segment_tokens(n) <= 0:
            continue
        starts.append((i * SEGMENT_SAMPLES, n))
        valids.append(_mel_frames(n))
    if not starts:
        return []

    padded = torch.zeros(len(starts), SEGMENT_SAMPLES, dtype=compute_dtype)
    for row, (start, n) in enumerate(starts):
        padded[row, :n] = w[start:start + n].to(compute_dtype)

    window = torch.hann_window(N_FFT, periodic=True, dtype=compute_dtype)
    spec = torch.stft(padded, n_fft=N_FFT, hop_length=HOP_LENGTH, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs() ** 2                                   # (S, 201, 3000)
    fb = torch.from_numpy(_mel_filters_np()).to(compute_dtype)         # (128, 201)
    mel = fb @ power                                                    # (S, 128, 3000)
    log = torch.clamp(mel, min=1e-10).log10()
    floor = log.amax(dim=(1, 2), keepdim=True) - 8.0
    log = torch.maximum(log, floor)
    log = (log + 4.0) / 4.0
    return [log[row, :, :valid].to(torch.float32).contiguous() for row, valid in enumerate(valids)]


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Fixed positional table (length, channels): sines in the first half, cosines in the second.

    Frequencies are exp(-j * ln(max_timescale) / (channels/2 - 1)) for j = 0 .. channels/2 - 1.
    """
    if channels % 2:
        raise ValueError(f"sinusoid width must be even, got {channels}")
    half = channels // 2
    step = math.log(max_timescale) / (half - 1) if half > 1 else 0.0
    inv_timescales = torch.exp(-step * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _clamp_half(h: torch.Tensor) -> torch.Tensor:
    """Pull non-finite values of a 16-bit tensor back into range (the reference does this)."""
    if h.dtype in (torch.float16, torch.bfloat16):
        # the reference clamps only when something is not finite; choosing on the device keeps its
        # result without making the host read the answer (a sync per layer on a GPU)
        limit = torch.finfo(h.dtype).max - 1000
        h = torch.where(torch.isfinite(h).all(), h, torch.clamp(h, min=-limit, max=limit))
    return h


class _SelfAttention(nn.Module):
    """Bidirectional multi-head attention over packed sequences (k_proj has no bias)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=True)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=True)

    def forward(self, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """h: (sum(lengths), d), samples concatenated; each attends only to its own frames."""
        n, d = h.shape
        q = self.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(h).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(h).view(n, self.num_heads, self.head_dim)
        # one varlen call for every clip (lengths are host ints: no device read)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(h.device, non_blocking=True)
        o = varlen(q, k, v, cu, max(lengths), causal=False)
        return self.out_proj(o.reshape(n, d))


class _EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: attention then a GELU MLP, each with a residual."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = _SelfAttention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=1e-5)

    def forward(self, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = h + self.self_attn(self.self_attn_layer_norm(h), lengths)
        h = h + self.fc2(F.gelu(self.fc1(self.final_layer_norm(h))))
        return _clamp_half(h)


class AudioEncoder(nn.Module):
    """Whisper-large-v3-shaped audio encoder with the checkpoint's parameter names.

    Two convolutions (k3 s1 and k3 s2, both padding 1, exact GELU) halve the frame rate; a fixed
    sinusoidal table (persistent buffer `positional_embedding`) is added in float32; then
    `encoder_layers` pre-LN blocks with non-causal attention restricted to each sample's valid
    frames, and a final LayerNorm. There is no dropout, so train/eval mode does not matter.
    """

    def __init__(self, num_mel_bins: int, d_model: int, encoder_layers: int,
                 encoder_attention_heads: int, encoder_ffn_dim: int,
                 max_source_positions: int = 1500):
        super().__init__()
        self.num_mel_bins = num_mel_bins
        self.d_model = d_model
        self.max_source_positions = max_source_positions
        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", _sinusoids(max_source_positions, d_model),
                             persistent=True)
        self.layers = nn.ModuleList(
            _EncoderLayer(d_model, encoder_attention_heads, encoder_ffn_dim)
            for _ in range(encoder_layers))
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-5)

    def forward(self, mel: torch.Tensor, encoder_length: torch.Tensor,
                mel_length: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a right-zero-padded mel batch.

        mel: (B, num_mel_bins, T); encoder_length: (B,) valid output frames per sample, at most
        (T - 1)//2 + 1. Returns (B, (T - 1)//2 + 1, d_model), zero beyond each sample's length.

        mel_length: optional (B,) valid mel frames. When given, the first convolution's output
        beyond it is zeroed, which makes every sample's result independent of the batch (equal
        to encoding it alone). Without it, a sample with an odd mel length lets the batch
        padding reach its last encoder frame, as in the reference.
        """
        if mel.ndim != 3 or mel.shape[1] != self.num_mel_bins:
            raise ValueError(f"expected mel of shape (B, {self.num_mel_bins}, T), got {tuple(mel.shape)}")
        x = mel.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        if mel_length is not None:
            frames = torch.arange(x.shape[-1], device=x.device)
            keep = frames[None, :] < mel_length.to(x.device)[:, None]
            x = x * keep[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)                    # (B, T2, d)
        batch, t2, _ = x.shape
        if t2 > self.max_source_positions:
            raise ValueError(f"{t2} encoder frames exceed max_source_positions={self.max_source_positions}")
        x = (x.float() + self.positional_embedding[:t2].float()).to(x.dtype)

        # lengths are host values (the caller knows them from the features' shapes): the gather
        # and scatter indices below are built on the host, so nothing waits for the device
        all_lengths = [int(n) for n in (encoder_length.tolist() if torch.is_tensor(encoder_length) else encoder_length)]
        if len(all_lengths) != batch:
            raise ValueError(f"encoder_length must have {batch} values, got {len(all_lengths)}")
        if any(n < 0 or n > t2 for n in all_lengths):
            raise ValueError(f"encoder_length must lie in [0, {t2}], got {all_lengths}")
        lengths = [n for n in all_lengths if n > 0]

        out = x.new_zeros(batch, t2, self.d_model)
        if not lengths:
            return out
        # made on the device from host lengths: a host-built index copied over would wait for the device
        rows = torch.cat([b * t2 + torch.arange(n, device=x.device) for b, n in enumerate(all_lengths) if n > 0])
        h = x.reshape(batch * t2, -1).index_select(0, rows)            # (sum(len), d), sample-major
        for layer in self.layers:
            h = layer(h, lengths)
        return out.reshape(batch * t2, -1).index_copy(0, rows, self.layer_norm(h).to(out.dtype)).view_as(out)


# --------------------------------------------------------------------------------------------
# Pooler and residual vector quantiser
# --------------------------------------------------------------------------------------------

class _Codebook(nn.Module):
    """One codebook; `embed_avg` and `cluster_size` are EMA training state kept for loading."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        embed = torch.randn(size, dim)
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.embed_avg = nn.Parameter(embed.clone(), requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(size), requires_grad=False)


class _Quantizer(nn.Module):
    """A residual-VQ stage (holds `codebook`, matching the checkpoint's `vq_list.{k}.codebook`)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = _Codebook(size, dim)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword (Euclidean, float32) for each row of x (N, dim).

        Distances are sqrt(max(|x|^2 + |e|^2 - 2 x.e, 0)) as in the reference; ties go to the
        lowest index.
        """
        x = x.float()
        embed = self.codebook.embed.float()
        sq = (x.pow(2).sum(1, keepdim=True) + embed.pow(2).sum(1)[None, :]) - 2.0 * (x @ embed.t())
        return sq.clamp_min(0.0).sqrt().argmin(dim=1)


class AudioVQBridge(nn.Module):
    """Gated convolutional pooler (4 encoder frames -> 1 vector) plus a residual VQ.

    Parameter names follow the checkpoint: gate_proj/up_proj (Conv1d, kernel = stride =
    avg_pooler, no bias), down_proj (Linear, no bias), layer_norm, proj_decoder (decode side,
    unused here) and vq_list.{k}.codebook.{embed, embed_avg, cluster_size} (frozen Parameters).
    """

    def __init__(self, d_model: int, avg_pooler: int, codebook_sizes: Sequence[int]):
        super().__init__()
        if not codebook_sizes:
            raise ValueError("need at least one codebook")
        self.d_model = d_model
        self.avg_pooler = avg_pooler
        dim = d_model * avg_pooler
        self.gate_proj = nn.Conv1d(d_model, dim, kernel_size=avg_pooler, stride=avg_pooler, bias=False)
        self.up_proj = nn.Conv1d(d_model, dim, kernel_size=avg_pooler, stride=avg_pooler, bias=False)
        self.down_proj = nn.Linear(dim, dim, bias=False)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj_decoder = nn.Linear(dim, d_model, bias=True)
        self.vq_list = nn.ModuleList(_Quantizer(int(size), dim) for size in codebook_sizes)

    @property
    def n_codebooks(self) -> int:
        return len(self.vq_list)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T2, d) -> (B, ceil(T2/avg_pooler), d*avg_pooler) pooled, normalised vectors."""
        x = x.to(self.gate_proj.weight.dtype)
        batch, t2, d = x.shape
        groups = -(-t2 // self.avg_pooler)
        x = F.pad(x, (0, 0, 0, groups * self.avg_pooler - t2))
        xt = x.transpose(1, 2)                                         # (B, d, T)
        gate = self.gate_proj(xt).transpose(1, 2)                      # (B, T4, d*p)
        up = self.up_proj(xt).transpose(1, 2)
        stacked = x.reshape(batch, groups, d * self.avg_pooler)        # frames side by side
        return self.layer_norm(self.down_proj(F.silu(gate) * up) + stacked)

    def encode(self, x: torch.Tensor, bridge_length: torch.Tensor) -> torch.Tensor:
        """Codes of the valid groups: LongTensor (sum(bridge_length), n_codebooks), sample-major.

        x: encoder output (B, T2, d_model), zero on padded frames; bridge_length: (B,) groups to
        keep per sample (valid encoder frames // avg_pooler). Each stage picks the nearest
        codeword of the current residual in float32, and the residual is rounded back to the
        module's dtype before the next stage (which matters in bf16).
        """
        res = self.pool(x)
        batch, groups, _ = res.shape
        lengths = [int(n) for n in (bridge_length.tolist() if torch.is_tensor(bridge_length) else bridge_length)]
        if len(lengths) != batch or any(n < 0 or n > groups for n in lengths):
            raise ValueError(f"bridge_length {lengths} does not fit {groups} groups x {batch} samples")
        rows = torch.cat([b * groups + torch.arange(n, device=res.device) for b, n in enumerate(lengths)])
        r = res.reshape(batch * groups, -1).index_select(0, rows)      # (N, d*p), sample-major
        codes = []
        for quantizer in self.vq_list:
            idx = quantizer.nearest(r)
            codes.append(idx)
            q = quantizer.codebook.embed[idx]
            r = (r.float() - q.float()).to(res.dtype)
        return torch.stack(codes, dim=-1).long()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class AudioTokenizer(nn.Module):
    """Mel segments -> residual-VQ codes; holds `audio_model` and `audio_bridge_model`.

    Always frozen: `encode` runs under no_grad. Build it from the checkpoint's audio_config with
    `AudioTokenizer.from_config(cfg)`; load weights with the `audio_tokenizer.` prefix stripped.
    """

    def __init__(self, num_mel_bins: int, d_model: int, encoder_layers: int,
                 encoder_attention_heads: int, encoder_ffn_dim: int, avg_pooler: int,
                 codebook_sizes: Sequence[int], max_source_positions: int = 1500):
        super().__init__()
        self.audio_model = AudioEncoder(num_mel_bins, d_model, encoder_layers,
                                        encoder_attention_heads, encoder_ffn_dim,
                                        max_source_positions)
        self.audio_bridge_model = AudioVQBridge(d_model, avg_pooler, codebook_sizes)

    @classmethod
    def from_config(cls, audio_config: Any) -> AudioTokenizer:
        """From a dict (or attribute object) shaped like config.json's audio_config."""
        vq = _cfg_get(audio_config, "vq_config")
        sizes = _cfg_get(vq, "codebook_sizes") if vq is not None else None
        if not sizes:
            raise ValueError("audio_config.vq_config.codebook_sizes is required")
        return cls(
            num_mel_bins=int(_cfg_get(audio_config, "num_mel_bins")),
            d_model=int(_cfg_get(audio_config, "d_model")),
            encoder_layers=int(_cfg_get(audio_config, "encoder_layers")),
            encoder_attention_heads=int(_cfg_get(audio_config, "encoder_attention_heads")),
            encoder_ffn_dim=int(_cfg_get(audio_config, "encoder_ffn_dim")),
            avg_pooler=int(_cfg_get(audio_config, "avg_pooler")),
            codebook_sizes=[int(s) for s in sizes],
            max_source_positions=int(_cfg_get(audio_config, "max_source_positions", 1500) or 1500),
        )

    @property
    def n_codebooks(self) -> int:
        return self.audio_bridge_model.n_codebooks

    def encode(self, features: Sequence[torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
        """Codes for a list of mel segments (n_mels, valid): LongTensor (total_tokens, n_codebooks).

        Segments are right-zero-padded into batches (of at most `batch_size`, default all),
        with encoder_length = (valid - 1)//2 + 1 and bridge_length = encoder_length // avg_pooler;
        rows come back in segment order, `segment_tokens`-many per segment (0 for a segment
        too short to fill one group). A segment's codes do not depend on its batch-mates.
        The result is on the module's device.
        """
        device = self.audio_model.conv1.weight.device
        n_cb = self.n_codebooks
        feats = [torch.as_tensor(f) for f in features]
        for f in feats:
            if f.ndim != 2 or f.shape[0] != self.audio_model.num_mel_bins or f.shape[1] < 1:
                raise ValueError(f"expected a feature of shape ({self.audio_model.num_mel_bins}, T>=1), "
                                 f"got {tuple(f.shape)}")
        step = batch_size or max(1, len(feats))
        pooler = self.audio_bridge_model.avg_pooler
        out = []
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(feats), step):
                    chunk = feats[start:start + step]
                    # every length from the features' shapes, on the host: no device reads
                    valid = [int(f.shape[1]) for f in chunk]
                    enc_len = [(n - 1) // 2 + 1 for n in valid]
                    bridge_len = [n // pooler for n in enc_len]
                    if sum(bridge_len) == 0:
                        continue
                    mel = torch.nn.utils.rnn.pad_sequence([f.T for f in chunk], batch_first=True).transpose(1, 2)
                    mel = mel.to(device=device, dtype=torch.float32, non_blocking=True)
                    hidden = self.audio_model(mel, enc_len, mel_length=torch.tensor(valid).to(device, non_blocking=True))
                    out.append(self.audio_bridge_model.encode(hidden, bridge_len))
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, n_cb, dtype=torch.long, device=device)
        return torch.cat(out, dim=0)
