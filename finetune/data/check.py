"""Dataset checker: reports every problem of every line (or table row) at once, plus a summary.

JSONL files (ours, or LLaMA-Factory / ms-swift / OpenAI ones converted in memory) are read line by
line; Parquet files, `datasets` save_to_disk folders and hub sources row by row (finetune.data.hf),
with their problems located by row.

Usage: ``python -m finetune.data.check FILE [FILE...]``
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from finetune.data.convert import dataset_ref, read_converted
from finetune.data.hf import _get, load_hf_samples
from finetune.data.samples import (  # noqa: F401  (media_errors, modality_errors: the checker's API)
    MediaChecker,
    audio_notes,
    media_errors,
    modality_errors,
    problems_of,
    unexpected_error,
)
from finetune.data.schema import (
    MEDIA_TYPES,
    DataError,
    Limits,
    Sample,
    iter_jsonl,
    parse_sample,
    set_limits,
    special_file,
)
from finetune.data.sources import describe, load_json_records, source_format
from finetune.errors import UserError
from finetune.paths import cache_root


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`."""

    files: list[str]
    n_samples: int
    n_ok: int
    errors: list[DataError]
    modality_counts: dict[str, int]
    token_counts: list[int] | None = None
    #: what the model reads differently from the files (audio truncated to its processor's limit,
    #: video sound it does not read): one line each, said once for the dataset
    notes: list[str] = field(default_factory=list)

    def error_counts(self) -> dict[str, int]:
        """Number of errors per kind, most frequent first."""
        return dict(Counter(e.kind for e in self.errors).most_common())

    def format(self) -> str:
        """Every error on its own line, then a summary with an optional token histogram."""
        lines = [str(e) for e in self.errors]
        if lines:
            lines.append("")
        n_files = len(self.files)
        lines.append(
            f"checked {n_files} file{'s' if n_files != 1 else ''}: "
            f"{self.n_samples} samples, {self.n_ok} ok, {len(self.errors)} errors"
        )
        counts = self.error_counts()
        if counts:
            lines.append("errors by kind:")
            width = max(len(k) for k in counts)
            lines += [f"  {k:<{width}}  {v}" for k, v in counts.items()]
        if self.modality_counts:
            lines.append("modality mix:")
            width = max(len(k) for k in self.modality_counts)
            mix = sorted(self.modality_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            lines += [f"  {k:<{width}}  {v}" for k, v in mix]
        if self.token_counts:
            lines += _histogram(self.token_counts)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _histogram(counts: list[int], buckets: int = 8, bar_width: int = 40) -> list[str]:
    arr = np.asarray(counts)
    lo, hi = int(arr.min()), int(arr.max())
    out = [
        f"token lengths (n={len(arr)}): min {lo}, median {round(float(np.median(arr)))}, "
        f"p95 {round(float(np.percentile(arr, 95)))}, max {hi}"
    ]
    n_buckets = min(buckets, hi - lo + 1)
    edges = np.linspace(lo, hi + 1, n_buckets + 1)
    hist, _ = np.histogram(arr, bins=edges)
    top = max(int(hist.max()), 1)
    labels = [f"{int(np.ceil(edges[i]))}-{int(np.ceil(edges[i + 1])) - 1}" for i in range(n_buckets)]
    width = max(len(s) for s in labels)
    for label, n in zip(labels, hist):
        bar = "#" * max(int(round(n / top * bar_width)), 1 if n else 0)
        out.append(f"  {label:>{width}} | {bar + ' ' if bar else ''}{int(n)}")
    return out


def _modality_key(sample: Sample) -> str:
    present = [t for t in MEDIA_TYPES if t in sample.modalities()]
    return "+".join(present) if present else "text-only"


def _records(path: Path, errors: list[DataError], allow_outside_paths: bool):
    """(line, object, relocate) triples of a dataset file, and whether outside paths are allowed.

    Our JSONL is read as is. LLaMA-Factory (a `dataset_info.json#name` too), ms-swift and OpenAI
    files are converted in memory first; conversion errors are reported as they are, and `relocate`
    moves a later error of a converted sample to its source record (its line, or record[i] in a JSON
    list). Converted media paths are absolute and were held inside the dataset's folder by the
    conversion. A problem of the whole file (preference data) is its one error."""
    try:
        res = read_converted(path, on_error="skip", allow_outside_paths=allow_outside_paths)
    except DataError as e:
        errors.append(e)
        return [], True
    if res is None:
        return ((line, obj, None) for line, obj in iter_jsonl(path)), allow_outside_paths
    errors.extend(res.errors)
    return [(loc.line, obj, loc.relocate) for loc, obj in zip(res.locations, res.samples)], True


def check_dataset(
    paths: list[Path],
    *,
    token_counter: Callable[[Sample], int] | None = None,
    max_tokens: int | None = None,
    allow_outside_paths: bool = False,
    open_media: bool = True,
    family=None,
    processor=None,
    config: dict | None = None,
    limits: Limits | None = None,
) -> CheckReport:
    """Validate every line of every file and collect all problems into a report.

    With ``open_media`` every referenced media file is decoded; with
    ``token_counter`` each error-free sample is measured and samples longer
    than ``max_tokens`` are reported as ``too_long``. With a ``family`` and its
    ``processor`` (and the model's ``config``, read from the processor's folder
    when omitted) each sample is also encoded as training encodes it and checked
    as the model's forward will check it (see finetune.data.prepare).
    ``limits`` (a recipe's ``data.max_*``; default the current ones) bound every
    line, text and media file before it is parsed or decoded; one sample's
    failure, whatever it is, is that sample's error and the check goes on.
    """
    if limits is not None:
        set_limits(limits)
    if family is not None and token_counter is None:
        token_counter = lambda s: family.count_tokens(s, processor)  # noqa: E731
    files = [_describe(p) for p in paths]
    errors: list[DataError] = []
    modality_counts: Counter[str] = Counter()
    token_counts: list[int] | None = [] if token_counter is not None else None
    n_samples = n_ok = 0
    checker = MediaChecker()
    tally: dict[str, int] = {}

    def sample_checks(sample: Sample) -> list[DataError]:
        found: list[DataError] = modality_errors(sample, family) if family is not None else []
        if found:  # nothing to decode or count for a model that cannot take it
            return found
        try:
            if open_media:
                found += media_errors(sample, checker)
            if token_counter is not None and not found:
                found += _count_tokens(sample, token_counter, max_tokens, token_counts)
            if family is not None and open_media and not found:

                found += problems_of(sample, family, processor, config or {}, None, None, checker, tally)[1]
        except Exception as e:  # one sample never ends the report, whatever it raises (MemoryError too)
            found.append(unexpected_error(e, sample.source, sample.line))
        return found

    for item in paths:
        if _is_table(item):
            # Parquet, save_to_disk folders, hub datasets: every row built and validated, then each
            # sample checked as a JSONL sample is (its media files are the materialised ones)
            try:
                table_errors, table_samples = _table(item, allow_outside_paths)
            except Exception as e:  # a table the datasets library chokes on is that source's one error
                table_errors, table_samples = [unexpected_error(e, _describe(item), 0)], []
            errors += table_errors
            n_samples += len(table_errors) + len(table_samples)
            for sample in table_samples:
                modality_counts[_modality_key(sample)] += 1
                sample_errors = sample_checks(sample)
                errors += sample_errors
                n_ok += not sample_errors
            if not table_errors and not table_samples:
                errors.append(DataError("empty", "the dataset has no rows", "add rows", file=_describe(item)))
            continue
        path = Path(item)
        source = str(path)
        what = special_file(path)
        if what is not None:
            errors.append(DataError("not_regular_file", f"the dataset file is {what}, not a regular file",
                                    "give the dataset file itself; only regular files are read (a FIFO or device "
                                    "could block the reader or never end)", file=source))
            continue
        if not path.is_file() and not dataset_ref(path):
            errors.append(DataError("missing_file", f"dataset file '{path}' does not exist",
                                    "check the file path", file=source))
            continue
        n_in_file = 0
        n_errors = len(errors)
        try:
            records, outside = _records(path, errors, allow_outside_paths)
        except Exception as e:  # the file cannot be read at all (a whole-file JSON nested 200k deep, ...)
            errors.append(e if isinstance(e, DataError) else unexpected_error(e, source, 0))
            continue
        n_samples += len(errors) - n_errors  # records that failed conversion
        n_in_file += len(errors) - n_errors
        for lineno, obj, relocate in records:
            n_samples += 1
            n_in_file += 1
            if isinstance(obj, DataError):
                errors.append(obj)
                continue
            try:
                sample = parse_sample(obj, source=source, line=lineno, base_dir=path.parent,
                                      allow_outside_paths=outside)
            except DataError as e:
                errors.append(relocate(e) if relocate else e)
                continue
            except Exception as e:  # MemoryError, RecursionError, a path the OS refuses, ...
                errors.append(unexpected_error(e, source, lineno))
                continue
            modality_counts[_modality_key(sample)] += 1
            sample_errors = sample_checks(sample)
            errors += [relocate(e) for e in sample_errors] if relocate else sample_errors
            if not sample_errors:
                n_ok += 1
        if n_in_file == 0:
            errors.append(DataError("empty", "the file has no samples",
                                    "add one JSON sample per line", file=source))

    notes = []
    if family is not None:

        notes = audio_notes(tally, family, processor)
    return CheckReport(files=files, n_samples=n_samples, n_ok=n_ok, errors=errors,
                       modality_counts=dict(modality_counts), token_counts=token_counts, notes=notes)


def _is_table(item) -> bool:
    """A source read with the `datasets` library (a Parquet file, a save_to_disk folder, a source
    object with hub/format hf), not one of our JSONL files."""

    if not isinstance(item, (str, Path)):
        return True  # a data-source object (recipe.py's DataSource): sources decides, in _table
    return source_format(item) == "hf"


def _describe(item) -> str:
    return describe(item)


def _table(item, allow_outside_paths: bool) -> tuple[list[DataError], list[Sample]]:
    """(errors, samples) of a table source, every bad row reported (a problem of the source itself,
    such as a missing column, is its one error)."""

    try:
        if source_format(item) == "jsonl":  # a source object naming a JSON(L) file
            path = Path(str(_get(item, "path")))
            if not path.is_file() and not dataset_ref(path):
                return [DataError("missing_file", f"dataset file '{path}' does not exist", "check the file path",
                                  file=str(path))], []
            samples, errs = load_json_records(path, on_error="skip", allow_outside_paths=allow_outside_paths)
            return errs, samples
        src = {"path": str(item)} if isinstance(item, (str, Path)) else item
        samples, errs = load_hf_samples(src, on_error="skip", allow_outside_paths=allow_outside_paths,
                                        media_dir=cache_root() / "media")
    except DataError as e:
        return [e], []
    except UserError as e:  # a hub id that is not in the cache, a bad source setting
        return [DataError("source", str(e), file=_describe(item))], []
    return errs, samples


def _count_tokens(sample: Sample, counter, max_tokens, token_counts: list[int]) -> list[DataError]:
    try:
        n = int(counter(sample))
    except DataError as e:  # located by the model's processor (a clip longer than it reads, ...)
        return [e]
    except Exception as e:  # any failure inside a model processor is a data problem here
        return [DataError("encode", f"encoding the sample failed: {type(e).__name__}: {e}",
                          "check the sample's text and media against the model's processor",
                          file=sample.source, line=sample.line)]
    token_counts.append(n)
    if max_tokens is not None and n > max_tokens:
        return [DataError("too_long", f"the sample has {n} tokens, more than data.max_tokens={max_tokens}",
                          "raise data.max_tokens or shorten the sample",
                          file=sample.source, line=sample.line)]
    return []


def main(argv: list[str] | None = None) -> int:
    """Check dataset files from the command line; exit status 1 when any error is found."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune.data.check",
        description="Validate omni-modal JSONL datasets and report every problem at once.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="dataset files: JSONL, Parquet, or save_to_disk folders")
    parser.add_argument("--no-media", action="store_true",
                        help="only check that media files exist; do not decode them")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="allow media paths outside each dataset file's folder")
    args = parser.parse_args(argv)
    report = check_dataset(args.files, allow_outside_paths=args.allow_outside_paths,
                           open_media=not args.no_media)
    print(report.format())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
