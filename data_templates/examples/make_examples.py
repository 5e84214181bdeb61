"""Regenerate the tiny example media and JSONL files in this folder.

Run from anywhere: ``python data_templates/examples/make_examples.py``.
The images are synthetic 64x64 grayscale "scans" and the audio is a 0.5 s
tone: they only exist so the examples pass ``finetune.data.check``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 64
SR = 16000


def fake_scan(seed: int, nodule: tuple[int, int, int] | None) -> Image.Image:
    """A 64x64 grayscale chest-like image, optionally with a bright round blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = 60 + 20 * rng.standard_normal((SIZE, SIZE))
    for cx in (20, 44):  # two darker "lungs"
        img -= 35 * np.exp(-(((x - cx) / 10) ** 2 + ((y - 32) / 20) ** 2))
    if nodule is not None:
        cx, cy, r = nodule
        img += 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def tone(freq: float, seed: int) -> np.ndarray:
    """0.5 s of a soft tone with a little noise, standing in for dictation."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.5 * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_jsonl(name: str, samples: list[dict]) -> None:
    """Write one sample per line, UTF-8, no ASCII escaping."""
    with open(HERE / name, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s, ensure_ascii=False) + "\n")


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def image(path: str) -> dict:
    return {"type": "image", "path": path}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def main() -> None:
    """Write all example media and the four example JSONL files."""
    (HERE / "img").mkdir(exist_ok=True)
    (HERE / "audio").mkdir(exist_ok=True)
    scans = {
        "cxr_0001.png": (1, (18, 22, 3)),
        "cxr_0002.png": (2, None),
        "cxr_0003.png": (3, (46, 40, 4)),
        "cxr_0004_prior.png": (4, (44, 36, 2)),
        "cxr_0004_current.png": (4, (44, 36, 4)),
        "cxr_0005_prior.png": (5, (20, 30, 3)),
        "cxr_0005_current.png": (5, (20, 30, 3)),
    }
    for name, (seed, nodule) in scans.items():
        fake_scan(seed, nodule).save(HERE / "img" / name, optimize=True)
    for i, freq in enumerate((220.0, 330.0, 440.0), start=1):
        sf.write(HERE / "audio" / f"note_{i:04d}.wav", tone(freq, i), SR, subtype="PCM_16")

    system = {"role": "system", "content": "You are a radiology assistant. Answer briefly."}

    write_jsonl("closed_vqa.jsonl", [
        {"id": "vqa-0001", "task": "closed_vqa", "answer": "yes", "messages": [
            system,
            user(image("img/cxr_0001.png"), text("Is there a nodule in the right upper lobe? Answer yes or no.")),
            {"role": "assistant", "content": "yes"}]},
        {"id": "vqa-0002", "task": "closed_vqa", "answer": "no", "messages": [
            system,
            user(image("img/cxr_0002.png"), text("Is there a pleural effusion? Answer yes or no.")),
            {"role": "assistant", "content": "no"}]},
        {"id": "vqa-0003", "task": "closed_vqa", "answer": "no", "messages": [
            user(image("img/cxr_0003.png"), text("Is the lesion in the left lung?")),
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Is it larger than 3 cm? Answer yes or no."},
            {"role": "assistant", "content": "no"}]},
    ])

    write_jsonl("report_generation.jsonl", [
        {"id": "rep-0001", "task": "report_generation", "messages": [
            {"role": "system", "content": "You write the impression section of chest radiograph reports."},
            user(image("img/cxr_0001.png"), text(
                "Findings: 9 mm rounded opacity in the right upper lobe. No effusion. "
                "Heart size normal.\nWrite the impression.")),
            {"role": "assistant", "content":
                "Solitary 9 mm right upper lobe nodule. Recommend CT chest for characterisation."}]},
        {"id": "rep-0002", "task": "report_generation", "messages": [
            {"role": "system", "content": "You write the impression section of chest radiograph reports."},
            user(image("img/cxr_0002.png"), text(
                "Findings: Lungs are clear. No pleural effusion or pneumothorax. "
                "Cardiomediastinal silhouette within normal limits.\nWrite the impression.")),
            {"role": "assistant", "content": "No acute cardiopulmonary abnormality."}]},
    ])

    write_jsonl("audio_question.jsonl", [
        {"id": "aud-0001", "task": "dictation_qa", "answer": "right upper lobe", "messages": [
            user({"type": "audio", "path": "audio/note_0001.wav"},
                 text("Where is the nodule mentioned in this dictated note?")),
            {"role": "assistant", "content": "right upper lobe"}]},
        {"id": "aud-0002", "task": "dictation_qa", "answer": "no", "messages": [
            user({"type": "audio", "path": "audio/note_0002.wav"},
                 text("Does the dictation mention a pleural effusion? Answer yes or no.")),
            {"role": "assistant", "content": "no"}]},
        {"id": "aud-0003", "task": "dictation_qa", "answer": "yes", "messages": [
            user({"type": "audio", "path": "audio/note_0003.wav"},
                 image("img/cxr_0003.png"),
                 text("Does the image agree with the dictated finding? Answer yes or no.")),
            {"role": "assistant", "content": "yes"}]},
    ])

    write_jsonl("multi_image.jsonl", [
        {"id": "cmp-0001", "task": "comparison", "answer": "larger", "messages": [
            user(text("Prior study:"), image("img/cxr_0004_prior.png"),
                 text("Current study:"), image("img/cxr_0004_current.png"),
                 text("Compared with the prior, is the nodule smaller, stable or larger?")),
            {"role": "assistant", "content": "larger"}]},
        {"id": "cmp-0002", "task": "comparison", "answer": "stable", "messages": [
            user(text("Prior study:"), image("img/cxr_0005_prior.png"),
                 text("Current study:"), image("img/cxr_0005_current.png"),
                 text("Compared with the prior, is the nodule smaller, stable or larger?")),
            {"role": "assistant", "content": "stable"}]},
    ])


if __name__ == "__main__":
    main()
