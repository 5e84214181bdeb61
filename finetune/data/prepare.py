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

from finetune.data.check import _MediaChecker, media_errors, modality_errors
from finetune.data.schema import DataError, Sample

_ENCODE_FIX = "run `python -m finetune data check --recipe RECIPE` on the file; it names the part to change"


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


def problems_of(s: Sample, family, processor, config: dict, rope, max_tokens: int | None,
                checker: _MediaChecker | None = None) -> tuple[int | None, list[DataError]]:
    """(planned token count, errors) of one sample: media decode, metadata count, encode + check."""
    n, errors, _ = _check(s, family, processor, config, rope, max_tokens, checker)
    return n, errors


def _check(s: Sample, family, processor, config: dict, rope, max_tokens: int | None,
           checker: _MediaChecker | None = None):
    """(planned token count, errors, the encoding when there was one) of one sample."""
    bad = modality_errors(s, family) or media_errors(s, checker)
    if bad:
        return None, bad, None

    def error(kind, problem, fix=_ENCODE_FIX):
        return DataError(kind, problem, fix, file=s.source, line=s.line, field="messages")

    try:
        n = family.count_tokens(s, processor)
    except Exception as e:  # a header or option the processor cannot use: the sample's problem
        return None, [error("encode", f"counting its tokens failed: {type(e).__name__}: {e}")], None
    if max_tokens is not None and n > max_tokens:
        return n, [error("too_long", f"{n} tokens exceed data.max_tokens={max_tokens}",
                         "raise data.max_tokens, lower model.max_pixels, or shorten the sample")], None
    try:
        enc = family.encode(s, processor, rope=rope)
    except Exception as e:
        return n, [error("encode", f"encoding it as training does failed: {type(e).__name__}: {e}")], None
    return n, [error("inconsistent", p) for p in family.check_encoded(enc, config, planned=n)], enc


def prepare(samples: list[Sample], family, processor, config: dict, rope, *, max_tokens: int | None,
            record: Path | None = None, stats: dict | None = None,
            encodings=None) -> tuple[list[Sample], list[int], list[DataError]]:
    """(usable samples, their planned token counts, the errors of the others), in input order.
    `stats` (if given) receives how many samples were checked now and how many were remembered.

    `encodings` (the collator's kept encodings: `has_room()`, `offer(i, encoded)`, i the sample's
    index among the usable ones) receives the encodings made here, so the first epoch does not
    make them again; while it has room, remembered samples are encoded for it too (the work the
    first epoch would do anyway, done once, before it)."""
    stats = {} if stats is None else stats
    import transformers

    import finetune

    # what the encoding depends on besides the sample: a new release of ours or of transformers
    # (which computes positions and processes media) checks every sample again
    settings = {"family": family.name, **processor.settings(), "versions": [finetune.__version__, transformers.__version__],
                "config": hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()}
    known: dict[str, int] = {}
    if record is not None and record.exists():
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged record only costs a re-check
    checker = _MediaChecker(record.with_name(record.stem + "-media.json") if record is not None else None)
    good, lengths, errors, seen = [], [], [], {}
    stats["checked"] = stats["remembered"] = 0
    try:
        for s in samples:
            key = sample_key(s, settings)
            n = known.get(key)
            enc = None
            if n is None or (max_tokens is not None and n > max_tokens):
                stats["checked"] += 1
                n, errs, enc = _check(s, family, processor, config, rope, max_tokens, checker)
                if errs:
                    errors.extend(errs)
                    continue
            else:
                stats["remembered"] += 1
                if encodings is not None and encodings.has_room():
                    enc = family.encode(s, processor, rope=rope)
            if encodings is not None and enc is not None:
                encodings.offer(len(good), enc)
            seen[key] = n
            good.append(s)
            lengths.append(n)
    finally:
        checker.save()
        if record is not None:
            from finetune.data.convert import atomic_write

            atomic_write(record, lambda fh: fh.write(json.dumps(seen)))
    return good, lengths, errors


def record_path(samples: list[Sample], root: Path) -> Path:
    """The record of a set of dataset files (one per combination, like the media record)."""
    sources = sorted({str(Path(s.source).resolve()) for s in samples})
    return root / "prepared" / f"{hashlib.sha1(json.dumps(sources).encode()).hexdigest()[:16]}.json"
