"""Pre-fill a temporary HF hub cache in huggingface_hub's own layout (tests never download).

    <cache>/models--org--name/          (datasets--org--name/ for a dataset repo)
        blobs/<sha256 of the content>   the files' bytes
        snapshots/<commit>/<path>       relative symlinks into ../../blobs/
        refs/<branch or tag>            the commit hash, no newline
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def prefill(cache: Path, repo_id: str, files: dict[str, Path | bytes], *, repo_type: str = "model",
            commit: str = "", refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` (path in the repo -> a file to copy, or bytes) into the cache as commit `commit`
    (default: a hash of the contents) with `refs` pointing at it; returns the snapshot folder."""
    contents = {rel: (src if isinstance(src, bytes) else Path(src).read_bytes()) for rel, src in files.items()}
    if not commit:
        h = hashlib.sha1()
        for rel in sorted(contents):
            h.update(rel.encode() + b"\0" + contents[rel])
        commit = h.hexdigest()
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file of a folder by its path relative to it (a model folder -> a snapshot)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
