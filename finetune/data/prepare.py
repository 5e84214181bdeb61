"""Every sample made ready before the first training step, and checked as the model will check it.

For each sample, once: its media decoded (a truncated file fails here, not in a worker midway),
its token count planned from metadata (what packing bins by), and the sample encoded exactly as
the collator will encode it and held against what the model's forward checks (each media kind's
placeholder tokens against the feature rows its encoder gives; the encoded length against the
planned one; data.max_tokens). A sample that fails is a located DataError: `raise` stops the run
before step 1 naming the first, `skip` drops and counts them.

Samples that passed are remembered (cache folder `prepared/`) by their content, the size and
modification time of every media file they use and the processor's settings, so a resume or
re-run starts at once; a changed file or setting is checked again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune import fsutil
from finetune.data.samples import MediaChecker, audio_notes, check_sample
from finetune.data.schema import DataError, Sample, current_limits


def _stats(part) -> list:
    paths = list(part.frames or []) or ([part.path] if part.path is not None else [])
    out = []
    for p in paths:
        p = Path(p)
        try:
            if p.is_dir():
                out.append([str(p), sorted((c.name, c.stat().st_size, c.stat().st_mtime_ns) for c in p.iterdir())])
            else:
                st = p.stat()
                out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), None])
    return out


def sample_key(s: Sample, settings: dict) -> str:
    """Fingerprint of what a sample's encoding depends on: its content, its media files' size and
    modification time, the processor's settings and the model's placeholder ids."""
    content = repr([(m.role, [(p.type, p.text, str(p.path), [str(f) for f in p.frames or []],
                               sorted(p.extra.items())) for p in m.parts]) for m in s.messages])
    media = [_stats(p) for m in s.messages for p in m.parts if p.is_media]
    blob = json.dumps([content, media, settings], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def prepare(samples: list[Sample], family, processor, config: dict, rope, *, max_tokens: int | None,
            record: Path | None = None, stats: dict | None = None,
            encodings=None) -> tuple[list[Sample], list[int], list[DataError]]:
    """(usable samples, their planned token counts, the errors of the others), in input order.
    `stats` (if given) receives how many samples were checked now and how many were remembered, and
    `truncated_audio`, the clips `data.long_audio: truncate` cut, when there are any (also printed).

    `encodings` (the collator's kept encodings: `has_room()`, `offer(i, encoded)`, i the sample's
    index among the usable ones) receives the encodings made here, so the first epoch does not
    make them again; while it has room, remembered samples are encoded for it too (the work the
    first epoch would do anyway, done once, before it)."""
    stats = {} if stats is None else stats
    import transformers

    import finetune

    # what the encoding depends on besides the sample: a new release of ours or of transformers
    # (which computes positions and processes media) checks every sample again
    # (and the caps on inputs: a sample that passed under a recipe's higher data.max_* must be checked
    # again under lower ones, not meet them in the collator mid-training)
    settings = {"family": family.name, **processor.settings(), "versions": [finetune.__version__, transformers.__version__],
                "config": hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest(),
                "limits": repr(current_limits())}
    known: dict[str, int | list[int]] = {}  # key -> planned tokens, or [planned tokens, clips truncated]
    if record is not None and record.exists():
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged record only costs a re-check
    checker = MediaChecker(record.with_name(record.stem + "-media.json") if record is not None else None)
    good, lengths, errors, seen = [], [], [], {}
    stats["checked"] = stats["remembered"] = 0
    truncated = 0
    try:
        for s in samples:
            key = sample_key(s, settings)
            n, cut = _remembered(known.get(key))
            enc = None
            if n is None or (max_tokens is not None and n > max_tokens):
                stats["checked"] += 1
                tally: dict = {}
                n, errs, enc = check_sample(s, family, processor, config, rope, max_tokens, checker, tally)
                if errs:
                    errors.extend(errs)
                    continue
                cut = tally.get("truncated_audio", 0)
            else:
                stats["remembered"] += 1
                if encodings is not None and encodings.has_room():
                    enc = family.encode(s, processor, rope=rope)
            if encodings is not None and enc is not None:
                encodings.offer(len(good), enc)
            seen[key] = [n, cut] if cut else n
            truncated += cut
            good.append(s)
            lengths.append(n)
    finally:
        checker.save()
        if record is not None:

            fsutil.atomic_write_text(record, json.dumps(seen))
    if truncated:  # reported, and in `stats` only when there are some
        stats["truncated_audio"] = truncated
        for note in audio_notes(stats, family, processor):
            print(f"data: {samples[0].source}: {note}", flush=True)
    return good, lengths, errors


def _remembered(value) -> tuple[int | None, int]:
    """(planned tokens, clips truncated) of a record entry (an int, or [tokens, truncated])."""
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]), int(value[1])
    return (int(value), 0) if isinstance(value, int) else (None, 0)


def record_path(samples: list[Sample], root: Path) -> Path:
    """The record of a set of dataset files (one per combination, like the media record)."""
    sources = sorted({str(Path(s.source).resolve()) for s in samples})
    return root / "prepared" / f"{hashlib.sha1(json.dumps(sources).encode()).hexdigest()[:16]}.json"
