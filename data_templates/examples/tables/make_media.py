"""Regenerate the tiny media used by the example tables in this folder.

Run from anywhere: ``python data_templates/examples/tables/make_media.py``.
The images are synthetic 32x32 grayscale "scans" and the audio a 0.25 s tone;
they only exist so that the tables convert into datasets that pass
``finetune.data.check``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 32
SR = 16000


def scan(seed: int, blob: tuple[int, int, float] | None) -> Image.Image:
    """A smooth 32x32 grayscale image with two dark "lungs" and an optional bright blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = 70 + 4 * rng.standard_normal((SIZE, SIZE))
    for cx in (10, 22):
        img -= 40 * np.exp(-(((x - cx) / 5) ** 2 + ((y - 16) / 10) ** 2))
    if blob is not None:
        cx, cy, r = blob
        img += 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main() -> None:
    """Write every example image and recording into media/."""
    media = HERE / "media"
    media.mkdir(exist_ok=True)
    images = {
        "scan_01.png": (1, (9, 11, 1.5)),
        "scan_02.png": (2, None),
        "scan_03.png": (3, (23, 20, 2.0)),
        "scan_04.png": (4, (12, 18, 1.0)),
        "prior_01.png": (5, (22, 18, 1.0)),
        "current_01.png": (5, (22, 18, 2.0)),
        "prior_02.png": (6, (10, 14, 1.5)),
        "current_02.png": (6, (10, 14, 1.5)),
    }
    for name, (seed, blob) in images.items():
        scan(seed, blob).save(media / name, optimize=True)
    t = np.arange(int(0.25 * SR)) / SR
    for i, freq in enumerate((262.0, 392.0), start=1):
        wave = 0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size)
        sf.write(media / f"note_{i:02d}.wav", wave.astype(np.float32), SR, subtype="PCM_16")


if __name__ == "__main__":
    main()
