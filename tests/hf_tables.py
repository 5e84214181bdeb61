"""Tables built from the synthetic demo set, for the tests of data sources read with `datasets`.

The same samples as the demo's JSONL: as chat rows (our messages, media parts taking the next item
of the `image` column of PNG bytes or of the `audio` column of {array, sampling_rate}), or as VQA
rows (image, audio, question, answer, system columns) with their equivalent JSONL objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf


def Source(**kw):
    """A data source as a recipe gives it (recipe.py's DataSource: path/hub, format, split, revision, columns)."""
    from finetune.recipe import DataSource

    return DataSource(**kw)


def _rows(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def chat_table(jsonl: Path, audio_dtype: str = "float32") -> list[dict]:
    """The demo samples as chat rows: the messages in our format with media parts that take the next
    item of the `image` column (PNG bytes) or `audio` column ({array, sampling_rate})."""
    root = jsonl.parent
    out = []
    for r in _rows(jsonl):
        images, audio, messages = [], [], []
        for m in r["messages"]:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            parts = []
            for p in content:
                if p["type"] == "image":
                    images.append((root / p["path"]).read_bytes())
                    parts.append({"type": "image", "text": None})
                elif p["type"] == "audio":
                    wave, rate = sf.read(root / p["path"], dtype=audio_dtype)
                    audio.append({"array": wave, "sampling_rate": rate})
                    parts.append({"type": "audio", "text": None})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            messages.append({"role": m["role"], "content": parts})
        out.append({"id": r["id"], "task": r["task"], "answer": r["answer"], "messages": messages,
                    "image": images, "audio": audio})
    return out


def vqa_table(jsonl: Path) -> tuple[list[dict], list[dict]]:
    """(VQA rows, the same samples as our JSONL objects) of the demo's one-turn samples: columns
    image (PNG bytes, datasets Image feature), audio (int16 arrays), question, answer (the reply),
    system; the JSONL puts the user parts in the VQA order (images, audio, question)."""
    root = jsonl.parent
    rows, objs = [], []
    for r in _rows(jsonl):
        if len(r["messages"]) != 3:
            continue  # multi-turn samples have no VQA row
        system, user, assistant = r["messages"]
        image = next((p for p in user["content"] if p["type"] == "image"), None)
        audio = next((p for p in user["content"] if p["type"] == "audio"), None)
        question = next(p["text"] for p in user["content"] if p["type"] == "text")
        wave = sf.read(root / audio["path"], dtype="int16")[0] if audio else None
        rows.append({"id": r["id"], "task": r["task"], "system": system["content"], "question": question,
                     "answer": assistant["content"],
                     "image": {"bytes": (root / image["path"]).read_bytes(), "path": None} if image else None,
                     "audio": {"array": wave, "sampling_rate": 16000} if audio else None})
        parts = ([{"type": "image", "path": image["path"]}] if image else []) + \
                ([{"type": "audio", "path": audio["path"]}] if audio else []) + [{"type": "text", "text": question}]
        objs.append({"id": r["id"], "task": r["task"], "answer": assistant["content"],
                     "messages": [system, {"role": "user", "content": parts}, assistant]})
    return rows, objs


def save_disk(rows: list[dict], folder: Path) -> Path:
    _datasets().Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def save_vqa_parquet(rows: list[dict], path: Path) -> Path:
    ds = _datasets().Dataset.from_list(rows).cast_column("image", _datasets().Image())
    ds.to_parquet(str(path))
    return path


def write_jsonl(objs: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path




def _datasets():
    import datasets

    return datasets
