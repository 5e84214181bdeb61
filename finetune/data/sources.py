"""One entry point for every kind of data source: our JSONL, tables read with `datasets`, hub ids.

A source is a plain path string (today's `data.train: file.jsonl`) or a data-source object with
`path` / `hub`, `format` (auto | jsonl | hf), `split`, `revision` and `columns` (recipe.py's
DataSource; a dict or a namespace with those names works too). `format: auto` reads a `.jsonl` file
(and any other single file) as JSON records, and a `.parquet` file, a glob, a `save_to_disk` folder, a
folder of Parquet files or a hub id with the `datasets` library (finetune.data.hf).

JSON records are our JSONL, or LLaMA-Factory (sharegpt, alpaca, v1), ms-swift and OpenAI-chat
records, recognised from the first records and converted in memory (finetune.data.convert); a
LLaMA-Factory dataset is also named through its list as `folder/dataset_info.json#name`. Preference
data is refused with one error for the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.convert import dataset_ref, read_converted
from finetune.data.hf import _get, is_hf_path, load_hf_samples
from finetune.data.schema import DataError, Limits, Sample, load_samples, parse_sample, set_limits, special_file
from finetune.errors import ConfigError, MissingFileError
from finetune.paths import cache_root

FORMATS = ("auto", "jsonl", "hf")


def source_format(src: Any) -> str:
    """jsonl | hf: how a source is read (its `format`, or from its path / hub id under auto)."""
    if isinstance(src, (str, Path)):
        src = {"path": str(src)}
    fmt = _get(src, "format") or "auto"
    hub, path = _get(src, "hub"), str(_get(src, "path"))
    if fmt not in FORMATS:
        raise ConfigError(f"data source format {fmt!r}: use one of {', '.join(FORMATS)}")
    if hub and path:
        raise ConfigError(f"data source: set path ({path!r}) or hub ({hub!r}), not both")
    if hub:
        if fmt == "jsonl":
            raise ConfigError(f"data source hub {hub!r}: format jsonl reads a local file; a hub dataset is read "
                              "with format hf (or auto)")
        return "hf"
    if fmt != "auto":
        return fmt
    return "hf" if is_hf_path(path) else "jsonl"


def describe(src: Any) -> str:
    """The source in a few words, for messages: its path or `hub:org/name`."""
    if isinstance(src, (str, Path)):
        return str(src)
    hub = _get(src, "hub")
    return f"hub:{hub}" if hub else str(_get(src, "path"))


def load_source(src: Any, recipe, *, on_error: str | None = None,
                media_dir: Path | None = None) -> tuple[list[Sample], list[DataError]]:
    """(samples, errors) of one data source, with the recipe's data.on_error (unless `on_error`) and
    data.allow_outside_paths. Relative paths resolve against the current folder, as for JSONL today;
    embedded media of tables go to `media_dir` (default: the toolkit cache's media/).
    The recipe's data.max_* caps become the limits every reader and decoder of this process uses."""
    on_error = on_error or recipe.data.on_error
    allow = recipe.data.allow_outside_paths
    set_limits(Limits.of(recipe.data))
    fmt = source_format(src)
    if fmt == "jsonl":
        path = Path(str(src if isinstance(src, (str, Path)) else _get(src, "path"))).expanduser()
        what = special_file(path)
        if what is not None and what != "a folder":
            raise DataError("not_regular_file", f"the dataset file is {what}, not a regular file",
                            "give the dataset file itself (data.train / data.eval in the recipe); only regular "
                            "files are read", file=str(path))
        if not path.is_file() and not dataset_ref(path):
            what = "is a folder without Parquet files or a saved dataset" if path.is_dir() else "does not exist"
            raise MissingFileError(f"data file {path} {what} (data.train / data.eval in the recipe)")
        return load_json_records(path, on_error=on_error, allow_outside_paths=allow)
    if isinstance(src, (str, Path)):
        src = {"path": str(src)}
    if media_dir is None:

        media_dir = cache_root() / "media"
    path = _get(src, "path")
    if path and not any(c in str(path) for c in "*?[") and not Path(str(path)).expanduser().exists():
        raise MissingFileError(f"data file {path} does not exist (data.train / data.eval in the recipe)")
    return load_hf_samples(src, on_error=on_error, allow_outside_paths=allow, media_dir=media_dir)


def load_json_records(path: Path, *, on_error: str, allow_outside_paths: bool) -> tuple[list[Sample], list[DataError]]:
    """(samples, errors) of a file of JSON records: our JSONL, or a LLaMA-Factory (also
    `dataset_info.json#name`), ms-swift or OpenAI file converted in memory, each sample located at
    its own record. Converted media paths are absolute and were held inside the dataset's folder by
    the conversion unless `allow_outside_paths`."""
    converted = read_converted(path, on_error=on_error, allow_outside_paths=allow_outside_paths)
    if converted is None:
        return load_samples(path, on_error=on_error, allow_outside_paths=allow_outside_paths)
    samples, errors = [], list(converted.errors)
    for loc, obj in zip(converted.locations, converted.samples):
        try:
            samples.append(parse_sample(obj, source=loc.file, line=loc.line, base_dir=Path(loc.file).parent,
                                        allow_outside_paths=True))
        except DataError as e:
            if on_error == "raise":
                raise loc.relocate(e) from None
            errors.append(loc.relocate(e))
    return samples, errors
