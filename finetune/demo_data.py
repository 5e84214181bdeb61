"""Deterministic synthetic "medical" dataset for the CPU demo recipe.

The data is designed so that a tiny, randomly initialised omni model can learn to answer
"Is there a lesion?" from low-resolution images within a few minutes of CPU training:

* two image kinds that are obviously different even at 32x32 pixels
  (a chest-X-ray-like torso with two lung fields, and a round fundus photograph);
* a lesion in exactly half of the images of each kind, drawn as a large high-contrast
  blob (a very bright nodule on the X-ray, a dark haemorrhage-like spot on the fundus)
  whose radius is 9-16 % of the image's shorter side;
* a chat-style JSONL sample format with image, audio and text-only turns.

Everything is generated from ``numpy.random.Generator`` streams derived from the seed, so
the files are byte-identical on rerun.  Usage::

    python -m finetune.demo_data OUT_DIR [--n-train N] [--n-eval N] [--seed S] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from finetune import fsutil
from finetune.errors import UserError

__all__ = [
    "generate_medical",
    "preference_pairs",
    "main",
    "LESION_QUESTIONS",
    "MODALITY_QUESTION",
    "AUDIO_QUESTION",
    "SYSTEM_PROMPT",
    "TEXT_QA",
    "SAMPLE_RATE",
    "MIN_SIDE",
    "MAX_SIDE",
]

SYSTEM_PROMPT = "You are a radiology assistant."
LESION_QUESTIONS = ("Is there a lesion?", "Is there a lesion in this image?", "Do you see a lesion?")
MODALITY_QUESTION = "What kind of scan is this?"
AUDIO_QUESTION = "Listen to the note and answer: is there a lesion?"

SAMPLE_RATE = 16_000
MIN_SIDE = 112
MAX_SIDE = 448
AUDIO_MIN_S = 1.0
AUDIO_MAX_S = 2.5

XRAY = "xray"
FUNDUS = "fundus"
KINDS = (XRAY, FUNDUS)

# (question, short answer, explanation sentence)
TEXT_QA: tuple[tuple[str, str, str], ...] = (
    ("What does MRI stand for?", "Magnetic resonance imaging",
     "It uses a strong magnetic field and radio waves to image soft tissue."),
    ("What does CT stand for?", "Computed tomography",
     "It combines many X-ray projections into cross-sectional images."),
    ("What does PET stand for?", "Positron emission tomography",
     "It images the distribution of a radioactive tracer in the body."),
    ("What does OCT stand for?", "Optical coherence tomography",
     "It uses light interference to image the layers of the retina."),
    ("What does ECG stand for?", "Electrocardiogram",
     "It records the electrical activity of the heart."),
)

MODALITY_ANSWER = {XRAY: "Chest X-ray", FUNDUS: "Fundus photograph"}
MODALITY_EXPLANATION = {
    XRAY: (
        "Two lung fields are visible with the mediastinum between them.",
        "The image shows the chest with both lungs and the ribs.",
        "It is a frontal projection of the thorax.",
    ),
    FUNDUS: (
        "The image shows the retina with the optic disc and vessels.",
        "A round view of the back of the eye is visible.",
        "The optic disc and retinal vessels are visible on a dark background.",
    ),
}

YES_TEMPLATES = {
    XRAY: (
        "A bright round lesion is seen in the {loc} of the image.",
        "There is a {size} dense nodule in the {loc} of the lung field.",
        "A well-defined {size} opacity is visible in the {loc} region.",
        "A {size} bright mass projects over the lung in the {loc} of the image.",
    ),
    FUNDUS: (
        "A dark round lesion is seen in the {loc} of the fundus.",
        "There is a {size} dark spot, consistent with a haemorrhage, in the {loc} of the retina.",
        "A well-defined {size} dark lesion is visible in the {loc} region.",
        "A {size} dark blot lies in the {loc} of the fundus.",
    ),
}
NO_TEMPLATES = {
    XRAY: (
        "The lung fields are clear.",
        "No focal abnormality is seen.",
        "The lungs look normal with no nodule or mass.",
        "Both lung fields appear normal.",
    ),
    FUNDUS: (
        "The retina looks normal.",
        "No focal abnormality is seen.",
        "Only the normal optic disc and vessels are visible.",
        "The fundus appears healthy with no spots.",
    ),
}

# split name -> (index used to derive the RNG stream, fraction of multi-turn samples)
_SPLITS = {"train": (0, 0.05), "eval": (1, 0.0)}
_EVAL_SEED_OFFSET = 1000
_MANAGED = ("images", "audio", "manifest.json", "README.md")
#: each split as preference pairs (the DPO demo's data), written beside train.jsonl and eval.jsonl
_PAIRS = ("train_pairs.jsonl", "eval_pairs.jsonl")
DEMO = "demo dataset"  # the marker's `what` of a demo folder
_LOCK = ".demo_data.lock"
_STAGING = ".demo_data"  # the temporary folder is .demo_data.tmp-<random>
#: where each demo recipe's dataset lives (data.demo: generated only for this data.train)
DEMO_FOLDERS = {"medical": Path("data/demo/medical")}


# ---------------------------------------------------------------------------------------------
# small drawing helpers (all float32, values in 0..255)
# ---------------------------------------------------------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _soft_ellipse(yy, xx, cy, cx, ry, rx, edge: float, angle: float = 0.0) -> np.ndarray:
    """Coverage mask (0..1) of an ellipse with a soft edge of ``edge`` pixels."""
    dy, dx = yy - cy, xx - cx
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    # approximate signed distance to the boundary in pixels
    dist = (1.0 - r) * min(rx, ry)
    return np.clip(dist / max(edge, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)


def _blend(img: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    return img * (1.0 - mask) + np.asarray(value, dtype=np.float32) * mask


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.3:
        return img
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=sigma, mode="nearest")


def _draw_layer(h: int, w: int, draw_fn) -> np.ndarray:
    """Rasterise with PIL (fast, deterministic) into a 0..1 float mask."""
    layer = Image.new("L", (w, h), 0)
    draw_fn(ImageDraw.Draw(layer))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width), sides within MIN_SIDE..MAX_SIDE, square or mildly rectangular."""
    short = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    if rng.random() < 0.4:
        long = short
    else:
        long = min(MAX_SIDE, int(round(short * rng.uniform(1.05, 1.3))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _location_phrase(cy: float, cx: float, h: int, w: int) -> str:
    fy, fx = cy / h, cx / w
    v = "upper" if fy < 0.4 else ("lower" if fy > 0.6 else "")
    hz = "left" if fx < 0.4 else ("right" if fx > 0.6 else "")
    if v and hz:
        return f"{v} {hz}"
    if v:
        return f"{v} middle"
    if hz:
        return f"middle {hz}"
    return "centre"


def _size_word(frac: float) -> str:
    return "small" if frac < 0.115 else ("medium-sized" if frac < 0.14 else "large")


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def _make_xray(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, dict[str, Any]]:
    h, w = _image_size(rng)
    s = float(min(h, w))
    yy, xx = _grid(h, w)
    bg = rng.uniform(12, 28)
    img = np.full((h, w), bg, dtype=np.float32)

    # torso: a broad superellipse that fills most of the frame (corners only slightly dark)
    tcx, tcy = w * rng.uniform(0.48, 0.52), h * rng.uniform(0.53, 0.58)
    trx, try_ = w * rng.uniform(0.47, 0.52), h * rng.uniform(0.55, 0.62)
    r4 = np.abs((xx - tcx) / trx) ** 4 + np.abs((yy - tcy) / try_) ** 4
    torso = np.clip((1.0 - r4) * 6.0, 0.0, 1.0)
    soft_tissue = rng.uniform(62, 80)
    img = _blend(img, torso, soft_tissue)

    # lungs: two brighter elliptical fields, tilted slightly outward
    lung_val = soft_tissue + rng.uniform(35, 50)
    lung_cy = h * rng.uniform(0.44, 0.50)
    lung_ry = h * rng.uniform(0.27, 0.32)
    lung_rx = w * rng.uniform(0.15, 0.18)
    offset = w * rng.uniform(0.20, 0.23)
    lungs = []
    for side in (-1, 1):
        cx = w * 0.5 + side * offset + rng.normal(0, 0.01 * w)
        ang = side * rng.uniform(0.05, 0.15)
        m = _soft_ellipse(yy, xx, lung_cy, cx, lung_ry, lung_rx, edge=0.02 * s, angle=-ang)
        lungs.append((cx, lung_cy, lung_rx, lung_ry, ang))
        img = _blend(img, m, lung_val)
    # gentle brightness gradient within the lungs (apices slightly darker)
    img += ((yy / h) - 0.5) * rng.uniform(-10, 4)

    # mediastinum (lighter central band) and the heart bulge
    med_val = lung_val + rng.uniform(25, 35)
    band = _soft_ellipse(yy, xx, h * 0.45, w * 0.5, h * 0.42, w * rng.uniform(0.055, 0.07), edge=0.02 * s)
    img = _blend(img, band * 0.9, med_val)
    heart = _soft_ellipse(
        yy, xx, h * rng.uniform(0.62, 0.67), w * rng.uniform(0.53, 0.57),
        h * rng.uniform(0.13, 0.16), w * rng.uniform(0.12, 0.15), edge=0.03 * s,
    )
    img = _blend(img, heart * 0.85, med_val - 5)

    # ribs: faint arcs on each side
    n_ribs = int(rng.integers(6, 9))
    top, bottom = h * 0.20, h * 0.78
    rib_w = max(1, int(round(0.012 * s)))

    def draw_ribs(d: ImageDraw.ImageDraw) -> None:
        for side in (-1, 1):
            for k in range(n_ribs):
                y0 = top + (bottom - top) * k / max(n_ribs - 1, 1) + rng.normal(0, 0.006 * h)
                x_in = w * 0.5 + side * w * 0.07
                x_out = w * 0.5 + side * w * 0.43
                pts = []
                for t in np.linspace(0.0, 1.0, 12):
                    x = x_in + (x_out - x_in) * t
                    y = y0 - 0.05 * h * math.sin(math.pi * t * 0.8) + 0.06 * h * t * t
                    pts.append((float(x), float(y)))
                d.line(pts, fill=255, width=rib_w)

    ribs = _draw_layer(h, w, draw_ribs) * torso
    img += ribs * rng.uniform(10, 16)

    info: dict[str, Any] = {"kind": XRAY, "lesion": bool(lesion), "height": h, "width": w}
    if lesion:
        cx, cy, rx, ry, ang = lungs[int(rng.integers(0, 2))]
        rad = float(rng.uniform(0.09, 0.16)) * s
        # centre inside the lung field (within 65 % of its radius)
        rr = 0.65 * math.sqrt(rng.random())
        th = rng.uniform(0, 2 * math.pi)
        lx = cx + rr * rx * math.cos(th)
        ly = cy + rr * ry * math.sin(th)
        val = rng.uniform(238, 252)
        m = _soft_ellipse(yy, xx, ly, lx, rad, rad * rng.uniform(0.9, 1.1), edge=0.15 * rad)
        img = _blend(img, m, val)
        info.update(cx=round(lx, 2), cy=round(ly, 2), radius=round(rad, 2), frac=round(rad / s, 4))

    img = _blur(img, 0.004 * s)
    img += rng.normal(0.0, rng.uniform(3.0, 5.0), size=img.shape).astype(np.float32)
    return _to_uint8(img), info


def _make_fundus(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, dict[str, Any]]:
    h, w = _image_size(rng)
    s = float(min(h, w))
    yy, xx = _grid(h, w)
    img = np.full((h, w), rng.uniform(2, 8), dtype=np.float32)

    cx, cy = w * 0.5 + rng.normal(0, 0.01 * s), h * 0.5 + rng.normal(0, 0.01 * s)
    big_r = s * rng.uniform(0.43, 0.47)
    disc = _soft_ellipse(yy, xx, cy, cx, big_r, big_r, edge=0.015 * s)
    centre_val = rng.uniform(140, 165)
    rad_norm = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / big_r
    fundus = centre_val - rng.uniform(20, 35) * np.clip(rad_norm, 0, 1) ** 2  # vignetting
    img = _blend(img, disc, 0.0) + disc * fundus

    # optic disc on one side, macula (subtle darker area) near the centre
    side = -1.0 if rng.random() < 0.5 else 1.0
    od_x = cx + side * big_r * rng.uniform(0.40, 0.50)
    od_y = cy + rng.normal(0, 0.04 * big_r)
    od_r = big_r * rng.uniform(0.12, 0.15)
    od = _soft_ellipse(yy, xx, od_y, od_x, od_r * rng.uniform(1.0, 1.15), od_r, edge=0.25 * od_r)
    img = _blend(img, od, rng.uniform(205, 225))
    mac = _soft_ellipse(yy, xx, cy, cx - side * 0.1 * big_r, 0.12 * big_r, 0.12 * big_r, edge=0.08 * big_r)
    img -= mac * rng.uniform(6, 12)

    # vessels: a few dark arcades leaving the optic disc
    n_vessels = int(rng.integers(3, 6))
    vessel_curves = []
    for k in range(n_vessels):
        up = -1.0 if k % 2 == 0 else 1.0
        spread = rng.uniform(0.35, 0.85)
        end_x = cx - side * big_r * rng.uniform(0.3, 0.8)
        end_y = cy + up * big_r * spread
        ctrl_x = od_x - side * big_r * rng.uniform(0.0, 0.2)
        ctrl_y = od_y + up * big_r * rng.uniform(0.5, 0.9)
        width = max(1, int(round(s * rng.uniform(0.008, 0.016))))
        vessel_curves.append(((od_x, od_y), (ctrl_x, ctrl_y), (end_x, end_y), width))

    def draw_vessels(d: ImageDraw.ImageDraw) -> None:
        for (x0, y0), (x1, y1), (x2, y2), width in vessel_curves:
            pts = []
            for t in np.linspace(0.0, 1.0, 24):
                a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t * t
                pts.append((float(a * x0 + b * x1 + c * x2), float(a * y0 + b * y1 + c * y2)))
            d.line(pts, fill=255, width=width, joint="curve")

    vessels = _draw_layer(h, w, draw_vessels) * disc
    img -= vessels * rng.uniform(40, 55)

    info: dict[str, Any] = {"kind": FUNDUS, "lesion": bool(lesion), "height": h, "width": w}
    if lesion:
        rad = float(rng.uniform(0.09, 0.16)) * s
        for _ in range(100):
            rr = 0.55 * math.sqrt(rng.random())
            th = rng.uniform(0, 2 * math.pi)
            lx, ly = cx + rr * big_r * math.cos(th), cy + rr * big_r * math.sin(th)
            if math.hypot(lx - od_x, ly - od_y) > rad + od_r * 1.1:
                break
        m = _soft_ellipse(yy, xx, ly, lx, rad, rad * rng.uniform(0.9, 1.1), edge=0.2 * rad)
        img = _blend(img, m, rng.uniform(12, 30))
        info.update(cx=round(lx, 2), cy=round(ly, 2), radius=round(rad, 2), frac=round(rad / s, 4))

    img = _blur(img, 0.004 * s)
    img += rng.normal(0.0, rng.uniform(3.0, 5.0), size=img.shape).astype(np.float32) * (0.3 + 0.7 * disc)
    return _to_uint8(img), info


def make_image(kind: str, lesion: bool, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """One synthetic grayscale image (uint8 HxW) and its metadata."""
    if kind == XRAY:
        return _make_xray(rng, lesion)
    if kind == FUNDUS:
        return _make_fundus(rng, lesion)
    raise ValueError(f"unknown image kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# audio: a synthetic "dictated note" (voiced syllables with formants, pauses and noise)
# ---------------------------------------------------------------------------------------------


def make_audio(rng: np.random.Generator) -> np.ndarray:
    """Mono float32 waveform at SAMPLE_RATE, 1.0-2.5 s long, peak about 0.5."""
    sr = SAMPLE_RATE
    total = int(round(rng.uniform(AUDIO_MIN_S + 0.05, AUDIO_MAX_S - 0.05) * sr))
    out = np.zeros(total, dtype=np.float64)
    f0_base = rng.uniform(100, 210)
    pos = int(rng.uniform(0.04, 0.12) * sr)
    end = total - int(0.05 * sr)
    while pos < end - int(0.06 * sr):
        n = min(int(rng.uniform(0.08, 0.24) * sr), end - pos)
        t = np.arange(n) / sr
        progress = pos / total
        f0 = f0_base * (1.0 - 0.15 * progress) * (1.0 + rng.uniform(-0.08, 0.08) * t / max(t[-1], 1e-3))
        phase = 2.0 * np.pi * np.cumsum(f0) / sr
        f1, f2 = rng.uniform(300, 800), rng.uniform(900, 2300)
        k = np.arange(1, int(3800 // f0_base) + 1)[:, None]
        fk = k * f0[None, :]
        amp = np.exp(-0.5 * ((fk - f1) / 90.0) ** 2) + 0.6 * np.exp(-0.5 * ((fk - f2) / 130.0) ** 2)
        amp += 0.05 / k
        syll = (amp * np.sin(k * phase[None, :])).sum(axis=0)
        env = np.sin(np.pi * np.arange(n) / n) ** 0.7
        out[pos:pos + n] += syll * env * rng.uniform(0.6, 1.0)
        pos += n + int(rng.uniform(0.02, 0.09) * sr)
    peak = float(np.max(np.abs(out))) or 1.0
    out = out / peak * 0.5
    out += rng.normal(0.0, 0.004, size=total)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------


def _task_counts(n: int, multi_frac: float) -> dict[str, int]:
    counts = {
        "text": int(round(0.05 * n)),
        "multi": int(round(multi_frac * n)),
        "audio": int(round(0.20 * n)),
        "modality": int(round(0.15 * n)),
    }
    lesion = n - sum(counts.values())
    for key in ("multi", "text", "modality", "audio"):  # only matters for tiny n
        take = min(counts[key], max(0, -lesion))
        counts[key] -= take
        lesion += take
    extra = lesion % 4  # keep (kind x lesion) exactly balanced for the lesion task
    return {"lesion": lesion - extra, "modality": counts["modality"] + extra, "audio": counts["audio"],
            "text": counts["text"], "multi": counts["multi"]}


def _balanced_conditions(n: int, rng: np.random.Generator) -> list[tuple[str, bool]]:
    combos = [(XRAY, True), (XRAY, False), (FUNDUS, True), (FUNDUS, False)]
    conds = [combos[i % 4] for i in range(n)]
    order = rng.permutation(n)
    return [conds[i] for i in order]


def _lesion_reply(info: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    kind = info["kind"]
    if info["lesion"]:
        tpl = YES_TEMPLATES[kind][int(rng.integers(len(YES_TEMPLATES[kind])))]
        loc = _location_phrase(info["cy"], info["cx"], info["height"], info["width"])
        return "Yes. " + tpl.format(loc=loc, size=_size_word(info["frac"])), "yes"
    tpl = NO_TEMPLATES[kind][int(rng.integers(len(NO_TEMPLATES[kind])))]
    return "No. " + tpl, "no"


def _modality_reply(kind: str, rng: np.random.Generator) -> tuple[str, str]:
    expl = MODALITY_EXPLANATION[kind][int(rng.integers(len(MODALITY_EXPLANATION[kind])))]
    short = MODALITY_ANSWER[kind]
    return f"{short}. {expl}", short.lower()


def _write_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _write_wav(wave: np.ndarray, path: Path) -> None:
    import soundfile as sf

    sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _build_split(root: Path, split: str, n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    split_index, multi_frac = _SPLITS[split]
    base = seed + (_EVAL_SEED_OFFSET if split == "eval" else 0)
    plan_rng = np.random.default_rng([base, split_index, 0])
    counts = _task_counts(n, multi_frac)
    tasks: list[str] = []
    for task, c in counts.items():
        tasks += [task] * c
    tasks = [tasks[i] for i in plan_rng.permutation(len(tasks))]
    conds = {t: iter(_balanced_conditions(counts[t], plan_rng)) for t in ("lesion", "modality", "audio", "multi")}
    text_order = plan_rng.permutation(max(counts["text"], 1))

    samples: list[dict[str, Any]] = []
    manifest: list[dict[str, Any]] = []
    text_i = 0
    for i, task in enumerate(tasks):
        sid = f"{split}-{i:04d}"
        rng = np.random.default_rng([base, split_index, 1, i])
        system = {"role": "system", "content": SYSTEM_PROMPT}
        if task == "text":
            q, short, expl = TEXT_QA[int(text_order[text_i % len(text_order)]) % len(TEXT_QA)]
            text_i += 1
            messages = [
                system,
                {"role": "user", "content": [{"type": "text", "text": q}]},
                {"role": "assistant", "content": f"{short}. {expl}"},
            ]
            samples.append({"id": sid, "messages": messages, "answer": short.lower(), "task": task})
            continue

        kind, lesion = next(conds[task])
        arr, info = make_image(kind, lesion, rng)
        rel_img = f"images/{sid}.png"
        _write_png(arr, root / rel_img)
        entry: dict[str, Any] = {"id": sid, "image": rel_img, **info}
        image_part = {"type": "image", "path": rel_img}

        if task == "lesion":
            q = LESION_QUESTIONS[int(rng.integers(len(LESION_QUESTIONS)))]
            reply, answer = _lesion_reply(info, rng)
            messages = [
                system,
                {"role": "user", "content": [image_part, {"type": "text", "text": q}]},
                {"role": "assistant", "content": reply},
            ]
        elif task == "modality":
            reply, answer = _modality_reply(kind, rng)
            messages = [
                system,
                {"role": "user", "content": [image_part, {"type": "text", "text": MODALITY_QUESTION}]},
                {"role": "assistant", "content": reply},
            ]
        elif task == "audio":
            rel_wav = f"audio/{sid}.wav"
            _write_wav(make_audio(rng), root / rel_wav)
            entry["audio"] = rel_wav
            reply, answer = _lesion_reply(info, rng)
            messages = [
                system,
                {"role": "user", "content": [
                    {"type": "audio", "path": rel_wav}, image_part, {"type": "text", "text": AUDIO_QUESTION},
                ]},
                {"role": "assistant", "content": reply},
            ]
        elif task == "multi":
            q = LESION_QUESTIONS[int(rng.integers(len(LESION_QUESTIONS)))]
            reply1, _ = _lesion_reply(info, rng)
            reply2, answer = _modality_reply(kind, rng)
            messages = [
                system,
                {"role": "user", "content": [image_part, {"type": "text", "text": q}]},
                {"role": "assistant", "content": reply1},
                {"role": "user", "content": [{"type": "text", "text": MODALITY_QUESTION}]},
                {"role": "assistant", "content": reply2},
            ]
        else:  # pragma: no cover
            raise AssertionError(task)
        samples.append({"id": sid, "messages": messages, "answer": answer, "task": task})
        entry["task"] = task
        manifest.append(entry)
    return samples, manifest


def preference_pairs(samples: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs (our JSONL's preference form) from demo samples: each sample's last reply
    is the chosen answer; the rejected one is the last reply of another sample of the same task
    with another answer (a lesion question answered the other way), or of any other sample when
    the task has no other answer. Media paths stay as they are (relative to the demo folder)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(samples):
        reply = s["messages"][-1]["content"]
        others = [t for t in samples if t.get("task") == s.get("task") and t.get("answer") != s.get("answer")
                  and t["messages"][-1]["content"] != reply]
        others = others or [t for t in samples if t["messages"][-1]["content"] != reply]
        if not others:
            continue
        rejected = others[int(rng.integers(len(others)))]["messages"][-1]["content"]
        last = {"role": "assistant", "chosen": reply, "rejected": rejected}
        out.append({**s, "id": f"{s.get('id', i)}-pair", "messages": s["messages"][:-1] + [last]})
    return out


def _write_jsonl(samples: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def _readme(n_train: int, n_eval: int, seed: int, stats: dict[str, dict[str, int]]) -> str:
    lines = [
        "# Synthetic medical demo dataset",
        "",
        "Generated by `finetune.demo_data.generate_medical` "
        f"(n_train={n_train}, n_eval={n_eval}, seed={seed}). Regenerate with:",
        "",
        "```",
        f"python -m finetune.demo_data OUT_DIR --n-train {n_train} --n-eval {n_eval} --seed {seed}",
        "```",
        "",
        "Everything is synthetic and deterministic (numpy `Generator` streams derived from the seed; "
        "the eval split uses seed + 1000, so its images differ from the training images). "
        "It is meant for smoke tests and the CPU demo recipe only - it is not medical data.",
        "",
        "* `images/*.png` - grayscale images, sides 112-448 px: chest-X-ray-like (torso, two bright lung "
        "fields, lighter mediastinum, faint rib arcs) or fundus-like (round disc on black, bright optic "
        "disc, dark vessels). Half of the images of each kind carry a lesion: a very bright round nodule "
        "inside a lung field (X-ray) or a dark round spot inside the fundus, radius 9-16 % of the shorter side.",
        "* `audio/*.wav` - 1.0-2.5 s mono 16 kHz PCM_16 \"dictated notes\" (formant-like voiced chirps plus "
        "noise); they carry no information about the answer.",
        "* `train.jsonl`, `eval.jsonl` - chat samples `{id, messages, answer, task}`; media paths are relative "
        "to this folder. `answer` is the lowercase short reference answer of the last assistant turn, and "
        "every assistant reply starts with it (capitalised, followed by a period).",
        "* `manifest.json` - per-image ground truth (kind, lesion, lesion centre and radius, size).",
        "",
        "Task mixture (`task` field):",
        "",
        "| split | " + " | ".join(stats["train"].keys()) + " |",
        "|---|" + "---|" * len(stats["train"]),
    ]
    for split, c in stats.items():
        lines.append(f"| {split} | " + " | ".join(str(v) for v in c.values()) + " |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialise concurrent generations into the same folder (e.g. several ranks)."""
    with fsutil.lock(out_dir / _LOCK):
        yield


def _legacy_demo(folder: Path) -> bool:
    """A demo folder generated before the marker existed: our README and manifest."""
    try:
        return ((folder / "manifest.json").is_file()
                and (folder / "README.md").read_text(encoding="utf-8").startswith("# Synthetic medical demo dataset"))
    except (OSError, UnicodeDecodeError):
        return False


def check_demo_folder(out_dir: Path) -> None:
    """Refuse (fsutil.NotOursError, naming it) a folder the demo may not be written into: one that
    is not missing, empty, or a demo folder the generator made. Writes nothing."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise fsutil.NotOursError(f"{out_dir} is a file; the demo dataset is written into a new or empty folder")
    rec = fsutil.read_marker(out_dir)
    if rec is not None and rec.get("what") == DEMO:
        return
    if rec is None and _legacy_demo(out_dir):
        return
    names = sorted(p.name for p in out_dir.iterdir() if p.name != _LOCK)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise fsutil.NotOursError(
            f"{out_dir} is not empty ({shown}) and is not a demo dataset folder made by omni-finetune: the demo is "
            "written only into a new or empty folder, or one it made; choose another folder (nothing was changed)")


def _check_managed(out_dir: Path, legacy: bool) -> None:
    """Before regenerating: every file of the names the generator replaces must be one it wrote
    (a folder generated before the record existed: its files are taken as the generator's)."""
    foreign = [f for name in (*_MANAGED, *_PAIRS, "train.jsonl", "eval.jsonl") if (out_dir / name).exists()
               for f in fsutil.foreign_files(out_dir, name)]
    if legacy:
        fsutil.update_owned(out_dir, add=foreign)
    elif foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise fsutil.NotOursError(f"{out_dir} holds files the demo generator did not write ({shown}); move them "
                                  "elsewhere and run again (nothing was changed)")


def generate_medical(
    out_dir: str | Path,
    n_train: int = 400,
    n_eval: int = 100,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Path]:
    """Generate the synthetic medical dataset into ``out_dir``.

    Returns ``{"train": out_dir/"train.jsonl", "eval": out_dir/"eval.jsonl"}``; beside them
    ``train_pairs.jsonl`` and ``eval_pairs.jsonl`` hold each split as preference pairs
    (preference_pairs; the DPO demo's data).  If all four files already exist and ``force`` is
    False nothing is written.  ``out_dir`` must be new, empty, or
    a demo folder the generator made (its fsutil marker records every file it wrote); anything
    else is refused (fsutil.NotOursError) before anything is written, and in a demo folder only
    the generator's own files are replaced (a file someone added among them stops it).  The
    dataset is built in a hidden temporary folder inside ``out_dir`` and moved into place at
    the end, with the two jsonl files (which mark a complete dataset) moved last.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    complete = [*paths.values(), *(out_dir / name for name in _PAIRS)]
    if not force and all(p.is_file() for p in complete):
        return paths
    check_demo_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        if not force and all(p.is_file() for p in complete):
            return paths  # another process finished it meanwhile
        check_demo_folder(out_dir)
        legacy = fsutil.read_marker(out_dir) is None and _legacy_demo(out_dir)
        fsutil.mark(out_dir, DEMO, generator="finetune.demo_data.generate_medical")
        _check_managed(out_dir, legacy)
        fsutil.recover_dir(out_dir / _STAGING)  # a generation killed midway
        tmp = fsutil.new_staging_dir(out_dir / _STAGING)
        try:
            (tmp / "images").mkdir()
            (tmp / "audio").mkdir()
            manifest: dict[str, list[dict[str, Any]]] = {}
            stats: dict[str, dict[str, int]] = {}
            for split, n in (("train", n_train), ("eval", n_eval)):
                samples, manifest[split] = _build_split(tmp, split, n, seed)
                _write_jsonl(samples, tmp / f"{split}.jsonl")
                _write_jsonl(preference_pairs(samples, seed), tmp / f"{split}_pairs.jsonl")
                stats[split] = {t: sum(s["task"] == t for s in samples)
                                for t in ("lesion", "modality", "audio", "text", "multi")}
            with open(tmp / "manifest.json", "w", encoding="utf-8", newline="\n") as f:
                json.dump({"seed": seed, "n_train": n_train, "n_eval": n_eval, "images": manifest}, f, indent=1)
                f.write("\n")
            (tmp / "README.md").write_text(_readme(n_train, n_eval, seed, stats), encoding="utf-8")

            # swap into place: invalidate the old dataset first, publish the jsonl files last
            for p in paths.values():
                fsutil.remove_owned(out_dir, p.name)
            fsutil.move_in(tmp, out_dir, [*_MANAGED, *_PAIRS, "eval.jsonl", "train.jsonl"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            fsutil.update_owned(out_dir, drop=[tmp.name])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.demo_data",
        description="Generate the deterministic synthetic medical demo dataset.",
    )
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if the dataset exists")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = generate_medical(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                                 force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"train: {paths['train']}\neval:  {paths['eval']}\n({dt:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
