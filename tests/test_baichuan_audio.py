"""Baichuan-Omni-1.5 audio tokenizer: token counts, log-mel features, encoder, residual VQ.

The reference numbers are computed here independently (numpy STFT and Slaney filterbank,
explicit encoder math, brute-force nearest codewords) rather than by calling the module twice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.families import baichuan_audio as ba

SR = 16000
TINY = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
            encoder_ffn_dim=64, avg_pooler=4, vq_config={"codebook_sizes": [16, 8, 8]})


def _clip(n: int, seed: int = 0) -> np.ndarray:
    """A tone plus noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    w = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.1 * np.sin(2 * np.pi * 2500.0 * t)
    w = w * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t)) + 0.02 * rng.standard_normal(n)
    return w.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, tokens", [
    (0.1, 1), (1, 12), (5, 62), (10, 125), (30, 375), (31, 387), (60, 750),
])
def test_token_count_examples(seconds, tokens):
    assert ba.audio_token_count(int(round(seconds * SR))) == tokens


def test_token_count_edges():
    assert ba.audio_token_count(0) == 0
    assert ba.audio_token_count(399) == 0          # shorter than one FFT window: no segment
    assert ba.audio_token_count(959) == 0          # under 60 ms: Bk == 0
    assert ba.audio_token_count(960) == 1
    assert ba.segment_tokens(959) == 0 and ba.segment_tokens(960) == 1
    assert ba.segment_lengths(399) == []
    assert ba.segment_lengths(400) == [400]
    assert ba.segment_lengths(480000) == [480000]
    assert ba.segment_lengths(31 * SR) == [480000, 16000]
    assert ba.segment_lengths(960000 + 399) == [480000, 480000]      # tiny tail dropped
    assert ba.segment_lengths(960000 + 900) == [480000, 480000, 900]  # kept, but gives 0 tokens
    assert ba.audio_token_count(960000 + 900) == 750
    assert ba.resampled_length(44100, 44100) == 16000
    assert ba.resampled_length(1, 44100) == 1


def test_segment_tokens_against_layer_arithmetic():
    """Derive the count from the STFT/conv/pooler shapes, the way a framework would."""
    def conv_out(length, k, s, p):
        return (length + 2 * p - k) // s + 1

    for n in [400, 959, 960, 1599, 1600, 12345, 16000, 80000, 479999, 480000]:
        stft_frames = conv_out(n, 400, 160, 200)            # centred STFT, reflect pad 200
        mel = min(3000, stft_frames)
        t2 = conv_out(conv_out(mel, 3, 1, 1), 3, 2, 1)
        assert ba.segment_tokens(n) == t2 // 4, n


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

def _slaney_filterbank() -> np.ndarray:
    """librosa-style Slaney mel filters (128, 201) for 16 kHz, n_fft 400, 0-8000 Hz."""
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep,
                        f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.arange(201) * (SR / 400)
    pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), 130))
    fb = np.zeros((128, 201))
    for i in range(128):
        lower = (fft_freqs - pts[i]) / (pts[i + 1] - pts[i])
        upper = (pts[i + 2] - fft_freqs) / (pts[i + 2] - pts[i + 1])
        fb[i] = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (pts[i + 2] - pts[i]))
    return fb


def _numpy_logmel(segment: np.ndarray) -> np.ndarray:
    """Independent float64 computation of one segment's features (128, valid)."""
    n = len(segment)
    valid = min(3000, n // 160 + 1)
    x = np.zeros(480000)
    x[:min(n, 480000)] = segment[:480000]
    x = np.pad(x, 200, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160]      # (3001, 400)
    assert frames.shape[0] == 3001
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)         # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2             # (3001, 201)
    mel = _slaney_filterbank() @ power[:-1].T                             # (128, 3000)
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0)[:, :valid]


def test_features_match_independent_numpy():
    n = 19750                                        # 1.234 s: valid = 124 frames
    wave = _clip(n)
    expected = _numpy_logmel(wave.astype(np.float64))
    (f64,) = ba.audio_features(wave, compute_dtype=torch.float64)
    (f32,) = ba.audio_features(wave)
    assert f32.dtype == torch.float32 and f64.dtype == torch.float32
    assert tuple(f32.shape) == (128, n // 160 + 1)
    assert np.abs(f64.numpy() - expected).max() < 1e-5
    # float32 STFT (the reference's precision) differs by float32 rounding near the -8 floor.
    assert np.abs(f32.numpy() - expected).max() < 1e-4
    # The reference pads with zeros before the STFT; reflecting the unpadded clip instead
    # changes the last frame by far more than the tolerance above.
    tail = np.pad(wave.astype(np.float64)[-600:], 200, mode="reflect")[-400:]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    zero_tail = np.concatenate([wave.astype(np.float64)[-200:], np.zeros(200)])
    assert np.abs(np.fft.rfft(tail * window) - np.fft.rfft(zero_tail * window)).max() > 1e-2


def test_features_match_whisper_feature_extractor():
    transformers = pytest.importorskip("transformers")
    wave = _clip(40000, seed=3)
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    ref = fe(wave, sampling_rate=SR, padding="max_length", max_length=480000,
             return_tensors="np")["input_features"][0]
    (ours,) = ba.audio_features(wave)
    assert np.abs(ours.numpy() - ref[:, :ours.shape[1]]).max() < 1e-6


def test_features_segments():
    n = 31 * SR + 37
    wave = _clip(n, seed=1)
    feats = ba.audio_features(wave)
    assert [tuple(f.shape) for f in feats] == [(128, 3000), (128, (n - 480000) // 160 + 1)]
    # Each segment is computed on its own (its own padding and its own max - 8 floor).
    assert np.abs(feats[0].numpy() - _numpy_logmel(wave[:480000].astype(np.float64))).max() < 1e-4
    assert torch.equal(feats[1], ba.audio_features(wave[480000:])[0])
    # A tail of 500 samples is a segment (>= n_fft) but gives no token, so it has no features.
    assert len(ba.audio_features(_clip(480000 + 500))) == 1
    assert ba.audio_features(_clip(900)) == []
    with pytest.raises(ValueError):
        ba.audio_features(np.zeros((2, 1000), dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# State-dict names
# ----------------------------------------------------------------------------------------------

def _expected_keys(layers: int, codebooks: int) -> list[str]:
    keys = ["audio_model.positional_embedding",
            "audio_model.conv1.weight", "audio_model.conv1.bias",
            "audio_model.conv2.weight", "audio_model.conv2.bias"]
    for i in range(layers):
        p = f"audio_model.layers.{i}."
        keys += [p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias",
                 p + "self_attn.k_proj.weight",
                 p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias",
                 p + "self_attn.out_proj.weight", p + "self_attn.out_proj.bias",
                 p + "self_attn_layer_norm.weight", p + "self_attn_layer_norm.bias",
                 p + "fc1.weight", p + "fc1.bias", p + "fc2.weight", p + "fc2.bias",
                 p + "final_layer_norm.weight", p + "final_layer_norm.bias"]
    keys += ["audio_model.layer_norm.weight", "audio_model.layer_norm.bias",
             "audio_bridge_model.gate_proj.weight", "audio_bridge_model.up_proj.weight",
             "audio_bridge_model.down_proj.weight",
             "audio_bridge_model.layer_norm.weight", "audio_bridge_model.layer_norm.bias",
             "audio_bridge_model.proj_decoder.weight", "audio_bridge_model.proj_decoder.bias"]
    for k in range(codebooks):
        keys += [f"audio_bridge_model.vq_list.{k}.codebook.{n}" for n in ("embed", "embed_avg", "cluster_size")]
    return keys


def test_state_dict_names_and_shapes():
    tok = ba.AudioTokenizer.from_config(TINY)
    sd = tok.state_dict()
    assert sorted(sd) == sorted(_expected_keys(2, 3))
    # Full size this is 5 + 15 * 32 + 2 = 487 encoder tensors and 7 + 3 * 8 = 31 bridge tensors.
    assert len(sd) == 5 + 15 * 2 + 2 + 7 + 3 * 3
    d, f, p = 32, 64, 4
    assert sd["audio_model.positional_embedding"].shape == (1500, d)
    assert sd["audio_model.conv1.weight"].shape == (d, 128, 3)
    assert sd["audio_model.conv2.weight"].shape == (d, d, 3)
    assert sd["audio_model.layers.1.fc1.weight"].shape == (f, d)
    assert sd["audio_model.layers.1.fc2.weight"].shape == (d, f)
    assert sd["audio_bridge_model.gate_proj.weight"].shape == (d * p, d, p)
    assert sd["audio_bridge_model.up_proj.weight"].shape == (d * p, d, p)
    assert sd["audio_bridge_model.down_proj.weight"].shape == (d * p, d * p)
    assert sd["audio_bridge_model.layer_norm.weight"].shape == (d * p,)
    assert sd["audio_bridge_model.proj_decoder.weight"].shape == (d, d * p)
    for k, size in enumerate([16, 8, 8]):
        pre = f"audio_bridge_model.vq_list.{k}.codebook."
        assert sd[pre + "embed"].shape == (size, d * p)
        assert sd[pre + "embed_avg"].shape == (size, d * p)
        assert sd[pre + "cluster_size"].shape == (size,)
    params = dict(tok.named_parameters())
    assert "audio_model.positional_embedding" not in params            # a buffer, not a parameter
    assert "audio_model.positional_embedding" in dict(tok.named_buffers())
    for k in range(3):
        for n in ("embed", "embed_avg", "cluster_size"):
            assert not params[f"audio_bridge_model.vq_list.{k}.codebook.{n}"].requires_grad
    # Module hyper-parameters that the names do not show.
    enc = tok.audio_model
    assert (enc.conv1.stride, enc.conv1.padding, enc.conv2.stride, enc.conv2.padding) == ((1,), (1,), (2,), (1,))
    assert enc.layers[0].self_attn_layer_norm.eps == 1e-5 and enc.layer_norm.eps == 1e-5
    assert tok.audio_bridge_model.gate_proj.stride == (4,)


def test_positional_embedding_values():
    pe = ba.AudioEncoder(8, 16, 1, 2, 32, max_source_positions=100).positional_embedding
    inc = math.log(10000.0) / (8 - 1)
    pos = np.arange(100)[:, None] * np.exp(-inc * np.arange(8))[None, :]
    expected = np.concatenate([np.sin(pos), np.cos(pos)], axis=1)
    assert pe.dtype == torch.float32 and pe.shape == (100, 16)
    assert np.abs(pe.numpy() - expected).max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------

def _tiny_encoder(seed: int = 0) -> ba.AudioEncoder:
    torch.manual_seed(seed)
    enc = ba.AudioEncoder(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, max_source_positions=64)
    with torch.no_grad():  # non-trivial norms so that a swapped weight/bias would show
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return enc.eval()


def _manual_encoder(enc: ba.AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """One unpadded sample (n_mels, T) -> (T2, d), written out from the layer equations."""
    sd = {k: v.double() for k, v in enc.state_dict().items()}
    x = mel.double()[None]
    x = F.gelu(F.conv1d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd["conv2.weight"], sd["conv2.bias"], stride=2, padding=1))[0].T
    h = x + sd["positional_embedding"][:x.shape[0]]
    heads, d = 4, h.shape[1]
    hd = d // heads

    def ln(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    for i in range(len(enc.layers)):
        p = f"layers.{i}."
        a = ln(h, p + "self_attn_layer_norm")
        q = a @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]
        k = a @ sd[p + "self_attn.k_proj.weight"].T
        v = a @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]
        outs = []
        for j in range(heads):
            sl = slice(j * hd, (j + 1) * hd)
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
            outs.append(w @ v[:, sl])
        h = h + torch.cat(outs, 1) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
        m = ln(h, p + "final_layer_norm") @ sd[p + "fc1.weight"].T + sd[p + "fc1.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        h = h + m @ sd[p + "fc2.weight"].T + sd[p + "fc2.bias"]
    return ln(h, "layer_norm")


def test_encoder_matches_layer_equations():
    enc = _tiny_encoder()
    mel = torch.randn(8, 23)
    with torch.no_grad():
        out = enc(mel[None], torch.tensor([12]))[0]
    assert out.shape == (12, 32)
    assert (out.double() - _manual_encoder(enc, mel)).abs().max() < 1e-5


@pytest.mark.parametrize("short_len", [37, 38])
def test_encoder_batch_independence_and_zero_padding(short_len):
    enc = _tiny_encoder(1)
    long_len = 61
    a, b = torch.randn(8, short_len), torch.randn(8, long_len)
    batch = torch.zeros(2, 8, long_len)
    batch[0, :, :short_len], batch[1] = a, b
    el = torch.tensor([(short_len - 1) // 2 + 1, (long_len - 1) // 2 + 1])
    with torch.no_grad():
        out = enc(batch, el, mel_length=torch.tensor([short_len, long_len]))
        alone_a = enc(a[None], el[:1], mel_length=torch.tensor([short_len]))[0]
        alone_b = enc(b[None], el[1:])[0]
        raw = enc(batch, el)                                   # no mel_length: reference behaviour
    assert out.shape == (2, 31, 32)
    la = int(el[0])
    assert (out[0, :la] - alone_a).abs().max() < 1e-6
    assert (out[1] - alone_b).abs().max() < 1e-6
    assert torch.all(out[0, la:] == 0)
    assert torch.all(raw[0, la:] == 0)
    if short_len % 2 == 0:
        # With an even mel length the batch padding never reaches a valid frame anyway.
        assert (raw[0, :la] - alone_a).abs().max() < 1e-6
    else:
        # With an odd one the last encoder frame sees conv1's output on a padding frame.
        assert (raw[0, :la] - alone_a).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Bridge and residual VQ
# ----------------------------------------------------------------------------------------------

def _manual_pool(bridge: ba.AudioVQBridge, x: torch.Tensor) -> torch.Tensor:
    """(T2, d) of one sample -> (T2 // 4, 4d) pooled vectors, from the layer equations, float64."""
    sd = {k: v.double() for k, v in bridge.state_dict().items()}
    rows = []
    for g in range(x.shape[0] // 4):
        frames = x[4 * g:4 * g + 4].double()                            # (4, d)
        gate = torch.einsum("oik,ki->o", sd["gate_proj.weight"], frames)
        up = torch.einsum("oik,ki->o", sd["up_proj.weight"], frames)
        y = sd["down_proj.weight"] @ (gate * torch.sigmoid(gate) * up) + frames.reshape(-1)
        mu, var = y.mean(), y.var(unbiased=False)
        rows.append((y - mu) / torch.sqrt(var + 1e-5) * sd["layer_norm.weight"] + sd["layer_norm.bias"])
    return torch.stack(rows)


def _brute_force_codes(vectors: torch.Tensor, codebooks: list[torch.Tensor], dtype) -> torch.Tensor:
    """Residual VQ by explicit distances to every codeword; residual rounded to `dtype`."""
    out = []
    for v in vectors:
        r, codes = v.to(dtype), []
        for cb in codebooks:
            dist = [float(((r.double() - cb[j].double()) ** 2).sum()) for j in range(cb.shape[0])]
            j = int(np.argmin(dist))
            codes.append(j)
            r = (r.float() - cb[j].float()).to(dtype)
        out.append(codes)
    return torch.tensor(out, dtype=torch.long)


def _tiny_bridge(seed: int = 0) -> ba.AudioVQBridge:
    torch.manual_seed(seed)
    bridge = ba.AudioVQBridge(d_model=32, avg_pooler=4, codebook_sizes=[16, 8, 8])
    with torch.no_grad():
        bridge.layer_norm.weight.uniform_(0.5, 1.5)
        bridge.layer_norm.bias.normal_(0, 0.1)
        for k, q in enumerate(bridge.vq_list):   # later stages see smaller residuals
            q.codebook.embed.mul_(0.5 ** k)
    return bridge


def test_vq_codes_match_brute_force():
    bridge = _tiny_bridge()
    x = torch.randn(2, 11, 32)
    enc_len = torch.tensor([11, 9])
    x[1, 9:] = 0
    bl = enc_len // 4                                                  # [2, 2]
    codes = bridge.encode(x, bl)
    assert codes.dtype == torch.long and codes.shape == (4, 3)
    pooled = torch.cat([_manual_pool(bridge, x[0, :11]), _manual_pool(bridge, x[1, :9])])
    assert (bridge.pool(x)[0, :2].double() - pooled[:2]).abs().max() < 1e-5
    cbs = [q.codebook.embed for q in bridge.vq_list]
    assert torch.equal(codes, _brute_force_codes(pooled.float(), cbs, torch.float32))
    # The codes use all stages (not a degenerate all-zero answer) and stay in range.
    assert codes[:, 0].unique().numel() > 1
    assert all(int(codes[:, k].max()) < s for k, s in enumerate([16, 8, 8]))
    # Sample 0 alone gives the same codes.
    assert torch.equal(bridge.encode(x[:1, :11], bl[:1]), codes[:2])


def test_vq_residual_rounded_to_module_dtype():
    bridge = _tiny_bridge(2).to(torch.bfloat16)
    x = torch.randn(1, 40, 32).to(torch.bfloat16)
    codes = bridge.encode(x, torch.tensor([10]))
    with torch.no_grad():
        pooled = bridge.pool(x)[0]
    assert pooled.dtype == torch.bfloat16
    cbs = [q.codebook.embed for q in bridge.vq_list]
    assert torch.equal(codes, _brute_force_codes(pooled, cbs, torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# Tokenizer end to end
# ----------------------------------------------------------------------------------------------

def test_tokenizer_encode_counts_and_batching():
    torch.manual_seed(0)
    tok = ba.AudioTokenizer.from_config(TINY)
    assert tok.n_codebooks == 3
    lengths = [1600, 20810, 31 * SR + 1234]
    clips = [_clip(n, seed=i) for i, n in enumerate(lengths)]
    feats = [ba.audio_features(w) for w in clips]
    assert [len(f) for f in feats] == [1, 1, 2]
    separate = []
    for n, f in zip(lengths, feats):
        codes = tok.encode(f)
        assert codes.dtype == torch.long
        assert codes.shape == (ba.audio_token_count(n), 3)
        assert codes.shape[0] == sum(ba.segment_tokens(m) for m in ba.segment_lengths(n))
        assert not codes.requires_grad
        separate.append(codes)
    assert [c.shape[0] for c in separate] == [1, 16, 375 + 13]
    all_feats = [f for fs in feats for f in fs]
    together = tok.encode(all_feats)
    assert torch.equal(together, torch.cat(separate))
    assert torch.equal(tok.encode(all_feats, batch_size=1), together)
    assert tok.encode([]).shape == (0, 3)
    assert tok.training                      # encode restores the module's mode


def test_tokenizer_from_config_object():
    class Cfg:
        num_mel_bins, d_model, encoder_layers, encoder_attention_heads = 128, 32, 1, 4
        encoder_ffn_dim, avg_pooler, max_source_positions = 64, 4, 200

        class vq_config:
            codebook_sizes = [8, 8]

    tok = ba.AudioTokenizer.from_config(Cfg)
    assert tok.audio_model.positional_embedding.shape == (200, 32)
    assert tok.n_codebooks == 2
    with pytest.raises(ValueError):
        tok.encode(ba.audio_features(_clip(31 * SR)))   # 1500 encoder frames > 200 positions


def test_vq_residual_rounding_decides_a_near_tie():
    """Build a stage-2 codebook whose choice flips if the residual is not re-rounded to bf16."""
    torch.manual_seed(5)
    bridge = ba.AudioVQBridge(d_model=32, avg_pooler=4, codebook_sizes=[4, 2]).to(torch.bfloat16)
    x = torch.randn(1, 4, 32).to(torch.bfloat16)
    with torch.no_grad():
        v = bridge.pool(x)[0, 0]
    e0 = bridge.vq_list[0].codebook.embed.detach()
    j0 = int(((v.double() - e0.double()) ** 2).sum(1).argmin())
    r32 = v.double() - e0[j0].double()                     # exact residual
    r16 = r32.to(torch.bfloat16).double()                   # what the module keeps
    assert (r32 - r16).abs().max() > 0
    gen = torch.Generator().manual_seed(0)
    found = None
    for _ in range(2000):
        scale = float((r32 - r16).abs().max()) * 4
        cand = (r16[None] + scale * torch.randn(2, r16.numel(), generator=gen, dtype=torch.float64))
        cand = cand.to(torch.bfloat16).double()
        d16 = ((r16[None] - cand) ** 2).sum(1)
        d32 = ((r32[None] - cand) ** 2).sum(1)
        if (d16.argmin() != d32.argmin() and float((d16[0] - d16[1]).abs()) > 1e-3
                and float((d32[0] - d32[1]).abs()) > 1e-3):
            found = (cand, int(d16.argmin()))
            break
    assert found is not None
    with torch.no_grad():
        bridge.vq_list[1].codebook.embed.copy_(found[0].to(torch.bfloat16))
    codes = bridge.encode(x, torch.tensor([1]))
    assert codes.tolist() == [[j0, found[1]]]
