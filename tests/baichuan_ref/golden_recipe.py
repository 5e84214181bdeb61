"""The recipe both sides of the Baichuan-Omni-1.5 golden numbers share (our own code).

build_reference.py imports it in the reference venv (transformers 4.45) to give the released
reference model its weights and media and to reduce the reference's outputs to a few numbers.
tests/test_baichuan_golden.py imports it in the toolkit's venv to regenerate the same weights and
media without the reference, and to reduce our outputs in the same way. It needs only torch, numpy
and Pillow, so that it behaves the same in both venvs.

- Weights: each state-dict entry is drawn from its own generator, whose seed comes from the
  entry's name, following a small per-entry rule (`weight_rule`). The rules are decided once from
  the reference's module types and recorded, so the test needs no reference code. A sha256 of the
  reference's own state dict after loading is recorded too, and a regeneration must reproduce it
  bit for bit.
- Media: seeded random PNG images and 16 kHz WAV clips (`make_media`), with a digest of the
  decoded pixels and samples.
- Logits: `reduce_logits` keeps a fixed set of columns at every position, per-position statistics
  over the whole vocabulary, and a random projection of each row (`sketch_matrix`).
"""

from __future__ import annotations

import hashlib
import math
import wave
from pathlib import Path

SEED = 0
INIT_STD = 0.1        # std of weight matrices and embeddings (the shrunk config's initializer_range)
BIAS_STD = 0.05       # noise on entries the reference initialises to 0 (biases)
NORM_STD = 0.1        # noise on entries the reference initialises to a nonzero constant (norm weights, ...)
N_RANDOM_COLUMNS = 64  # random vocabulary columns kept at every position
SKETCH_DIM = 8        # random projections of each logit row


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def key_seed(seed: int, name: str) -> int:
    """The generator seed of one state-dict entry: independent of the order entries are made in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def weight_rule(name: str, initial, is_parameter: bool) -> dict:
    """How an entry is drawn, decided from the reference model as its own __init__ left it.

    Persistent buffers are the fixed sinusoid tables (computed, not drawn). Parameters the
    reference leaves constant (biases at 0, norm weights at 1, VQ cluster sizes) get noise around
    that constant, so that a mistake in a bias or a norm weight changes the outputs. VQ codebooks
    keep their kaiming-uniform range, so that the codes stay spread over the codebook. Every other
    parameter is N(0, INIT_STD)."""
    shape = list(initial.shape)
    if not is_parameter:
        if name.endswith("positional_embedding") and len(shape) == 2:
            return {"kind": "sinusoids", "shape": shape}
        raise ValueError(f"no rule for the persistent buffer {name}")
    flat = initial.detach().reshape(-1)
    if flat.numel() and bool((flat == flat[0]).all()):
        base = float(flat[0])
        return {"kind": "offset", "shape": shape, "base": base, "std": NORM_STD if base != 0.0 else BIAS_STD}
    if name.endswith((".codebook.embed", ".codebook.embed_avg")):
        return {"kind": "uniform", "shape": shape, "bound": math.sqrt(6.0 / shape[-1])}
    return {"kind": "normal", "shape": shape, "std": INIT_STD}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0):
    """Whisper's fixed positional table: sines in the first half of the channels, cosines in the second."""
    import torch

    half = channels // 2
    inv = torch.exp(-(math.log(max_timescale) / (half - 1)) * torch.arange(half))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def make_tensor(name: str, rule: dict, seed: int):
    """One entry of the state dict, float32."""
    import torch

    shape = tuple(rule["shape"])
    if rule["kind"] == "sinusoids":
        return sinusoids(*shape).float()
    g = torch.Generator().manual_seed(key_seed(seed, name))
    if rule["kind"] == "normal":
        return torch.randn(shape, generator=g) * rule["std"]
    if rule["kind"] == "offset":
        return rule["base"] + torch.randn(shape, generator=g) * rule["std"]
    if rule["kind"] == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) * rule["bound"]
    raise ValueError(f"{name}: unknown weight rule {rule['kind']!r}")


def make_state_dict(rules: dict[str, dict], seed: int) -> dict:
    """The whole state dict from its recorded rules."""
    return {name: make_tensor(name, rule, seed) for name, rule in rules.items()}


def tensor_sha256(t) -> str:
    """sha256 of a tensor's shape and float32 little-endian bytes."""
    import numpy as np

    a = np.ascontiguousarray(t.detach().cpu().float().numpy()).astype("<f4", copy=False)
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def state_sha256(digests: dict[str, str]) -> str:
    """One digest over every entry's name and tensor digest, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Media
# ------------------------------------------------------------------------------------------------
MEDIA = {  # name: size; written in this order from one numpy Generator
    # 56x84 -> smart_resize keeps 56x84 -> grid (1,4,6) -> 6 tokens
    "image_56x84.png": (56, 84),
    # 70x98 -> round-half-even gives 56x112 (a real resize) -> grid (1,4,8) -> 8 tokens
    "image_70x98.png": (70, 98),
    # video frames 60x90 -> resized to 56x84 -> 6 tokens per frame
    "frame_0.png": (60, 90), "frame_1.png": (60, 90), "frame_2.png": (60, 90),
    "audio_2.6s.wav": 2.6,   # 41600 samples -> 261 mel frames -> 32 tokens
    "audio_1.3s.wav": 1.3,   # 20800 samples -> 131 mel frames -> 16 tokens
}


def write_png(path: Path, rng, h: int, w: int) -> None:
    import numpy as np
    from PIL import Image

    # noise on a random gradient, so that resizing does something
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * rng.uniform(1, 4) + xx * rng.uniform(1, 4)) % 256 for _ in range(3)], -1)
    img = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)


def write_wav(path: Path, rng, seconds: float, sr: int = 16000) -> None:
    import numpy as np

    n = round(seconds * sr)
    t = np.arange(n) / sr
    x = 0.05 * rng.standard_normal(n)
    for _ in range(3):
        x += rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t + rng.uniform(0, 6.3))
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def make_media(folder: Path, seed: int) -> dict[str, Path]:
    """The seeded images, video frames and clips, written into `folder`; {name: path}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, size in MEDIA.items():
        paths[name] = folder / name
        if name.endswith(".png"):
            write_png(paths[name], rng, *size)
        else:
            write_wav(paths[name], rng, size)
    return paths


def media_sha256(path: Path) -> str:
    """sha256 of the decoded content (RGB pixels or PCM samples), not of the file's encoding."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            data = np.asarray(im.convert("RGB")).tobytes() + repr(im.size).encode()
    else:
        with wave.open(str(path), "rb") as w:
            data = w.readframes(w.getnframes()) + repr((w.getnchannels(), w.getsampwidth(), w.getframerate())).encode()
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------
def logit_columns(vocab: int, always: list[int], seed: int) -> list[int]:
    """The columns kept at every position: N_RANDOM_COLUMNS seeded random ids plus `always`."""
    import torch

    g = torch.Generator().manual_seed(key_seed(seed, "logit_columns"))
    rand = torch.randperm(vocab, generator=g)[:N_RANDOM_COLUMNS].tolist()
    return sorted(set(rand) | set(always))


def sketch_matrix(vocab: int, seed: int):
    """[vocab, SKETCH_DIM] float64 N(0,1): each logit row is projected onto these directions."""
    import torch

    g = torch.Generator().manual_seed(key_seed(seed, "sketch"))
    return torch.randn((vocab, SKETCH_DIM), generator=g, dtype=torch.float64)


def reduce_logits(logits, columns: list[int], sketch) -> dict:
    """Logits [L, V] -> what is kept of them:
    cols [L, C] float32 (the values themselves), stats [L, 4] float64 (mean, std, max and logsumexp
    over the whole row), argmax [L] and sketch [L, SKETCH_DIM] float64 (row . each direction)."""
    import torch

    x = logits.detach().float()
    d = x.double()
    stats = torch.stack([d.mean(-1), d.std(-1), d.max(-1).values, torch.logsumexp(d, -1)], -1)
    return {"cols": x[:, columns].contiguous(), "stats": stats, "argmax": x.argmax(-1),
            "sketch": d @ sketch}


def row_stats(x):
    """[N, ...] -> [N, 2] float64: each row's sum and sum of squares."""
    import torch

    d = x.detach().double().reshape(x.shape[0], -1)
    return torch.stack([d.sum(-1), (d * d).sum(-1)], -1)
