"""A file through its converter: :func:`convert_file` (the format given or recognised),
:func:`read_converted` (a file given as data: None for our own JSONL, which
finetune.data.schema reads as it is) and a LLaMA-Factory ``dataset_info.json#name``.

An error on a record of another format names the ``--from`` that reads it (only one that does: a
suggestion never leads to another refusal)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.convert.detect import (
    _FORMAT_NAMES,
    _classify,
    _detect,
    _head,
    _preference_error,
    _preference_form,
    dominant_format,
)
from finetune.data.convert.llamafactory import (
    _convert_llamafactory,
    _info_entry,
    _info_record,
    _refuse_dataset_list,
    dataset_ref,
)
from finetune.data.convert.openai import _convert_openai
from finetune.data.convert.preference import convert_pair
from finetune.data.convert.ours import _convert_ours
from finetune.data.convert.records import (
    _PREFERENCE_FIX,
    ConvertResult,
    _check_on_error,
    _is_json_document,
    _Loc,
    _read_records,
)
from finetune.data.convert.sharegpt import _convert_swift
from finetune.data.schema import DataError
from finetune.errors import ConfigError

FORMATS = ("ours", "llamafactory", "swift", "openai")


_CONVERTERS = {
    "ours": _convert_ours,
    "openai": _convert_openai,
    "llamafactory": _convert_llamafactory,
    "swift": _convert_swift,
}


def _hinted(e: DataError, obj: Any, loc: _Loc, fmt: str, kw: dict) -> DataError:
    """A converter's error on a record of another format, with the `--from` that reads it (only one
    that does: a suggestion never leads to another refusal) or, for preference data, what to do."""
    other = _classify(obj)
    if other == "preference":
        fix = f"the record is preference data ({_preference_form(obj)}); {_PREFERENCE_FIX}"
    elif other in _CONVERTERS and other != fmt:
        try:
            _CONVERTERS[other](obj, loc, **kw)
        except DataError:
            return e
        fix = f"the record is in {_FORMAT_NAMES[other]}: convert it with --from {other}"
    else:
        return e
    return DataError(e.kind, e.problem, fix, file=e.file, line=e.line, field=e.field)


def _records(path: Path) -> tuple[list[tuple[_Loc, Any]], Iterator[tuple[_Loc, Any]]]:
    """A file's first 50 records (to judge its format by) and an iterator over the rest; a file of
    preference data raises one DataError."""
    records = _read_records(path)
    head = _head(records, 50)
    problem = _preference_error(head, str(path))
    if problem:
        raise problem
    return head, records


def _options(folder: Path, media_root, check_files: bool, role_map, allow_outside_paths: bool) -> dict:
    """The converters' keywords: media resolved against `media_root` (default: `folder`), and held
    inside `folder` unless `allow_outside_paths`."""
    return dict(base=Path(media_root) if media_root is not None else folder, check_files=check_files,
                role_map=role_map, within=None if allow_outside_paths else folder)


def _convert_records(result: ConvertResult, records, convert, fmt: str | None, on_error: str, kw: dict) -> None:
    for loc, obj in records:
        def make(obj=obj, loc=loc):
            try:
                # a preference record: its two conversations through the same converter, joined again
                return convert_pair(convert, obj, loc, **kw) or convert(obj, loc, **kw)
            except DataError as e:
                raise (_hinted(e, obj, loc, fmt, kw) if fmt else e) from None

        result.add(loc, obj, make, on_error)


def convert_file(
    src: str | os.PathLike,
    fmt: str = "auto",
    *,
    media_root: str | os.PathLike | None = None,
    on_error: str = "raise",
    check_files: bool = True,
    role_map: dict[str, str] | None = None,
    allow_outside_paths: bool = True,
) -> ConvertResult:
    """Convert a LLaMA-Factory / ms-swift / OpenAI / our-format file into samples in memory.

    `src` may name a dataset of a LLaMA-Factory `dataset_info.json` as `path/dataset_info.json#name`.
    Media paths are resolved against ``media_root`` (default: the file's
    folder; the info's folder for a dataset_info.json entry) and returned absolute;
    :func:`write_jsonl` makes them relative. Unless ``allow_outside_paths``, every media file must
    lie inside that folder, as for our JSONL. ``role_map`` maps extra role names to ours
    (``{"doctor": "assistant"}``). Preference pairs become our preference form (convert.preference);
    KTO feedback is refused with one error for the file.
    """
    _check_on_error(on_error)
    if fmt != "auto" and fmt not in _CONVERTERS:
        raise ConfigError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'")
    if role_map:
        bad = {k: v for k, v in role_map.items() if v not in ("user", "assistant", "system")}
        if bad:
            raise ConfigError(f"role_map targets must be user, assistant or system, not {bad}")
    ref = dataset_ref(src)
    if ref:
        if fmt not in ("auto", "llamafactory"):
            raise ConfigError(f"{src} names a LLaMA-Factory dataset: read it with --from llamafactory (or auto)")
        return _convert_dataset_info(*ref, media_root=media_root, on_error=on_error, check_files=check_files,
                                     role_map=role_map, allow_outside_paths=allow_outside_paths)
    src = Path(src)
    _refuse_dataset_list(src)
    head, records = _records(src)
    if fmt == "auto":
        fmt = _detect(head, str(src))
    kw = _options(src.parent, media_root, check_files, role_map, allow_outside_paths)
    result = ConvertResult(source=str(src), format=fmt)
    _convert_records(result, itertools.chain(head, records), _CONVERTERS[fmt], fmt, on_error, kw)
    if result.n_records == 0:
        raise DataError("empty", "the file has no records", "add records to the file", file=str(src))
    return result


def _convert_dataset_info(info: Path, name: str, *, media_root, on_error: str, check_files: bool, role_map,
                          allow_outside_paths: bool) -> ConvertResult:
    entry = _info_entry(info, name, allow_outside_paths)
    kw = _options(info.parent, media_root, check_files, role_map, allow_outside_paths)
    result = ConvertResult(source=f"{info}#{name}", format="llamafactory")
    for file in entry.files:
        head, records = _records(file)
        _convert_records(result, itertools.chain(head, records),
                         lambda obj, loc, **kw: _convert_llamafactory(_info_record(obj, entry, loc), loc, **kw),
                         None, on_error, kw)
    if result.n_records == 0:
        raise DataError("empty", f"dataset '{name}' has no records", "add records to its file", file=str(info))
    return result


def read_converted(path: str | os.PathLike, *, on_error: str = "raise",
                   allow_outside_paths: bool = False) -> ConvertResult | None:
    """A dataset file given as data (data.train, data.eval, `data check`): None for our own JSONL,
    which finetune.data.schema reads; else the samples of a LLaMA-Factory file (or
    `dataset_info.json#name`), ms-swift or OpenAI file, converted in memory, with media held inside
    the dataset's folder unless `allow_outside_paths`, as for our JSONL. Preference data and a
    dataset_info.json without a name raise one DataError for the file."""
    if not dataset_ref(path):
        path = Path(path)
        _refuse_dataset_list(path)
        fmt = dominant_format(path)
        if fmt == "ours" and not (path.is_file() and _is_json_document(path)):
            return None  # JSON lines of our own format: finetune.data.schema reads them as they are
        return convert_file(path, "ours" if fmt == "preference" else fmt, on_error=on_error,
                            allow_outside_paths=allow_outside_paths)
    return convert_file(path, on_error=on_error, allow_outside_paths=allow_outside_paths)
