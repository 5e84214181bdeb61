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
from finetune.data.schema import DataError, Sample, current_limits

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
                checker: _MediaChecker | None = None, tally: dict | None = None) -> tuple[int | None, list[DataError]]:
    """(planned token count, errors) of one sample: media decode, metadata count, encode + check.
    `tally` (if given) counts, over the samples that passed, the clips `data.long_audio: truncate`
    cut and the video sound tracks the model does not read (`audio_notes` words them)."""
    n, errors, _ = _check(s, family, processor, config, rope, max_tokens, checker, tally)
    if tally is not None and not errors:
        _count_video_sound(s, family, processor, tally)
    return n, errors


def _check(s: Sample, family, processor, config: dict, rope, max_tokens: int | None,
           checker: _MediaChecker | None = None, tally: dict | None = None):
    """(planned token count, errors, the encoding when there was one) of one sample."""
    bad = modality_errors(s, family) or media_errors(s, checker)
    if bad:
        return None, bad, None

    def error(kind, problem, fix=_ENCODE_FIX):
        return DataError(kind, problem, fix, file=s.source, line=s.line, field="messages")

    try:
        n = family.count_tokens(s, processor)
    except DataError as e:  # a located problem of the sample's own (a clip past the processor's limit, ...)
        return None, [e], None
    except Exception as e:  # a header or option the processor cannot use: the sample's problem
        return None, [error("encode", f"counting its tokens failed: {type(e).__name__}: {e}")], None
    if max_tokens is not None and n > max_tokens:
        return n, [error("too_long", f"{n} tokens exceed data.max_tokens={max_tokens}",
                         "raise data.max_tokens, lower model.max_pixels, or shorten the sample")], None
    try:
        enc = family.encode(s, processor, rope=rope)
    except DataError as e:
        return n, [e], None
    except Exception as e:
        return n, [error("encode", f"encoding it as training does failed: {type(e).__name__}: {e}")], None
    problems = [error("inconsistent", p) for p in family.check_encoded(enc, config, planned=n)]
    if tally is not None and not problems:
        tally["truncated_audio"] = tally.get("truncated_audio", 0) + truncated_clips(s, family, processor)
    return n, problems, enc


def truncated_clips(s: Sample, family, processor) -> int:
    """How many of a sample's clips `data.long_audio: truncate` cuts to what the family's processor
    reads (0 under error and split: those refuse or keep every sample)."""
    limit = family.max_audio_samples(processor)
    if processor.long_audio != "truncate" or limit is None:
        return 0
    return sum(n > limit for _, n, _ in family.audio_clips(s, processor))


def _count_video_sound(s: Sample, family, processor, tally: dict) -> None:
    """Video files with a sound track that the run does not read (the family cannot, or was not asked to)."""
    from finetune.data import media as M

    for msg in s.messages:
        for part in msg.parts:
            if part.type != "video" or part.path is None or not M.video_has_audio(part.path):
                continue
            if not family.audio_in_video:
                tally["video_sound_ignored"] = tally.get("video_sound_ignored", 0) + 1
            elif not family.reads_video_sound(s, part, processor):
                tally["video_sound_unread"] = tally.get("video_sound_unread", 0) + 1


def audio_notes(tally: dict, family, processor) -> list[str]:
    """One line for each kind of audio the run does not read whole (the tally of `problems_of` /
    `prepare`): clips truncated to the processor's limit, video sound tracks not read."""
    notes = []
    if tally.get("truncated_audio"):
        limit = family.max_audio_samples(processor) / processor.sampling_rate
        notes.append(f"{tally['truncated_audio']} audio clip(s) longer than the {limit:g} s that {family.title}'s processor "
                     f"reads were truncated to their first {limit:g} s (data.long_audio: truncate; split keeps all of "
                     "them as consecutive clips)")
    if tally.get("video_sound_ignored"):
        notes.append(f"{tally['video_sound_ignored']} video(s) have a sound track: {family.title}'s processor reads no "
                     "sound from a video, so they are read for their frames only")
    if tally.get("video_sound_unread"):
        notes.append(f"{tally['video_sound_unread']} video(s) have a sound track that is not read: set "
                     "model.use_audio_in_video: true (or \"use_audio_in_video\": true on a video part) to read it with "
                     f"the frames, as {family.title}'s processor does with use_audio_in_video")
    return notes


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
    checker = _MediaChecker(record.with_name(record.stem + "-media.json") if record is not None else None)
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
                n, errs, enc = _check(s, family, processor, config, rope, max_tokens, checker, tally)
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
            from finetune.data.convert import atomic_write

            atomic_write(record, lambda fh: fh.write(json.dumps(seen)))
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
