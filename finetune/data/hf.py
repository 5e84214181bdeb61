"""Datasets as they are published: Parquet files, `datasets` save_to_disk folders, hub dataset repos.

Medical VQA sets (VQA-RAD, SLAKE, PathVQA) are tables with the image embedded as bytes, a question
and an answer; speech sets hold audio as bytes or as arrays. They are read here with the `datasets`
library and each row becomes the same `Sample` a JSONL line would (the dict of our JSONL format is
built per row and validated by `schema.parse_sample`), in one of two shapes:

* a VQA row: `columns: {image, question, answer}` (and optionally audio, system, id, task) gives a
  one-turn chat: user [image(s), audio(s), question], assistant answer, with `answer` = the answer;
* a chat row: a `messages` column in our chat format; a media part carries its file in `path`
  (relative to the dataset's folder), embeds it (`image`/`audio` key: bytes, `{bytes, path}` or
  `{array, sampling_rate}`), or takes the next item of the `image` / `audio` column.

Embedded media are written once into a content-addressed file (`media_dir/<sha256>.<ext>`, audio
arrays as WAV) after a full decode check, so everything downstream (paths, the prepared-sample
record keyed on file size and mtime, token counting, packing) works as for JSONL, and a re-run or a
new epoch neither decodes nor rewrites them: an existing file is taken as it is (only files that
decoded are ever written, atomically).

Errors name the source (the Parquet file, the folder or the hub id) and the row, counted from 1
(row 1 is `dataset[0]`), in the `file:line` slot and again as "row N".
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from finetune import fsutil
from finetune.data import media
from finetune.data.schema import DataError, Sample, UnsafeJsonError, loads_bounded, parse_sample, special_file
from finetune.hub import resolve_dataset

#: our fields a dataset's columns can be mapped to (`columns: {our field: the dataset's column}`)
FIELDS = ("image", "audio", "question", "answer", "messages", "system", "id", "task", "chosen", "rejected")
#: markers of a `save_to_disk` folder (a Dataset: state.json + dataset_info.json; a DatasetDict:
#: dataset_dict.json)
DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
#: file suffix -> the `datasets` builder that reads it (format: hf)
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json",
            ".jsonl": "json"}

_BATCH = 256
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
_AUDIO_MAGIC = ((b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
                (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))
_PCM = {np.dtype("int16"): "PCM_16", np.dtype("int32"): "PCM_32", np.dtype("uint8"): "PCM_U8"}


def _get(src: Any, name: str, default: Any = "") -> Any:
    """An attribute of a data source (a DataSource dataclass, a namespace or a plain dict)."""
    if isinstance(src, dict):
        value = src.get(name, default)
    else:
        value = getattr(src, name, default)
    return default if value is None else value


def is_hf_path(path: str | Path) -> bool:
    """True for what format `auto` reads with the `datasets` library: a .parquet file, a glob, a
    save_to_disk folder, or a folder of Parquet files (a hub repo's layout)."""
    text = str(path)
    if any(c in text for c in "*?["):
        return True
    p = Path(text).expanduser()
    if p.is_dir():
        return any((p / m).is_file() for m in DISK_MARKERS) or next(p.rglob("*.parquet"), None) is not None
    return p.suffix.lower() == ".parquet"


# ---- opening ---------------------------------------------------------------------------------
def open_dataset(src: Any, *, split: str = "") -> tuple[Any, str, Path, Path]:
    """(the `datasets.Dataset` of a source's split, its label for messages, the folder relative media
    paths resolve against, the folder they must stay inside). A source is `path` (a file, a glob, a save_to_disk or Parquet folder) or
    `hub` (a dataset repo id, resolved through the HF cache at `revision`)."""
    import datasets

    split = split or _get(src, "split") or ""
    hub, path = _get(src, "hub"), str(_get(src, "path"))
    if hub:

        folder = resolve_dataset(hub, _get(src, "revision"))
        label = f"{hub}[{split or 'train'}]"
        # a snapshot's files are links into the repo's blobs/: paths stay inside the repo's cache folder
        return _open_folder(folder, split, label), label, folder, folder.parent.parent
    if not path:
        raise DataError("no_source", "the data source names neither a path nor a hub id",
                        "set path: (a file or folder) or hub: (org/name)")
    if any(c in path for c in "*?["):
        files = sorted(globlib.glob(os.path.expanduser(path), recursive=True))
        if not files:
            raise DataError("missing_file", f"no file matches {path!r}", "check the pattern", file=path)
        for f in files:
            _require_regular(Path(f), path)
        builder = _builder(files[0], path)
        ds = _load(lambda: datasets.load_dataset(builder, data_files=files, split="train"), path)
        base = Path(os.path.commonpath([str(Path(f).parent) for f in files]))
        return _one_split(ds, split, path), path, base, base
    p = Path(path).expanduser()
    if p.is_dir():
        label = str(p) if not (p / "dataset_dict.json").is_file() else f"{p}[{split or 'train'}]"
        _require_regular_tree(p, label)
        return _open_folder(p, split, label), label, p, p
    _require_regular(p, str(p))
    if not p.is_file():
        raise DataError("missing_file", f"dataset {p} does not exist", "check the path (data.train / data.eval "
                        "in the recipe; relative paths resolve against the current folder)", file=str(p))
    builder = _builder(str(p), str(p))
    ds = _load(lambda: datasets.load_dataset(builder, data_files=[str(p)], split="train"), str(p))
    return _one_split(ds, split, str(p)), str(p), p.parent, p.parent


def _require_regular(path: Path, label: str) -> None:
    """A dataset file that is a FIFO, device or socket is refused before `datasets` opens it (and blocks)."""
    what = special_file(path)
    if what is not None and what != "a folder":
        raise DataError("not_regular_file", f"'{path}' is {what}, not a regular file",
                        "remove it or replace it with the data file itself; only regular files are read", file=label)


def _require_regular_tree(folder: Path, label: str) -> None:
    """Every entry of a dataset folder (save_to_disk or a repo of Parquet files) that `datasets` may open."""
    for root, _, names in os.walk(folder):
        for name in names:
            _require_regular(Path(root) / name, label)


def _builder(file: str, label: str) -> str:
    suffix = Path(file).suffix.lower()
    if suffix not in BUILDERS:
        raise DataError("unknown_format", f"format hf reads {', '.join(BUILDERS)} files, not {suffix or 'this file'}",
                        "convert it to Parquet, or give a save_to_disk folder", file=label)
    return BUILDERS[suffix]


def _load(fn, label: str):
    """Run a `datasets` loader; its failures become a DataError naming the source."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as e:  # ArrowInvalid (not Parquet), FileNotFoundError, a bad split, ...
        raise DataError("unreadable_dataset", f"the datasets library cannot read it: {type(e).__name__}: {e}",
                        "check that it is a Parquet file, a save_to_disk folder or a dataset repo with data "
                        "files (and the split name)", file=label) from e


def _open_folder(folder: Path, split: str, label: str):
    import datasets

    if any((folder / m).is_file() for m in DISK_MARKERS):
        ds = _load(lambda: datasets.load_from_disk(str(folder)), label)
    else:  # a dataset repo's layout (data/train-*.parquet, README configs): splits from the file names
        ds = _load(lambda: datasets.load_dataset(str(folder)), label)
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError("unknown_split", f"the dataset has no split {name!r}; its splits: {', '.join(ds)}",
                            "set the source's split: to one of them", file=label)
        return ds[name]
    return _one_split(ds, split, label)


def _one_split(ds, split: str, label: str):
    if split and split != "train":
        raise DataError("unknown_split", f"it holds one table without split names, not a split {split!r}",
                        "remove split: (or give the folder or hub id of a dataset with splits)", file=label)
    return ds


# ---- columns ---------------------------------------------------------------------------------
def column_map(src: Any, names: list[str], label: str) -> dict[str, str]:
    """Our field -> the dataset's column: the source's `columns`, and for a field not mapped the
    column of the same name when the dataset has one. Every problem is found before any row is read:
    a mapped column the dataset lacks is an error that lists the dataset's columns."""
    given = dict(_get(src, "columns", {}) or {})
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise DataError("bad_columns", f"columns names unknown field(s) {', '.join(unknown)}",
                        f"map our fields ({', '.join(FIELDS)}) to the dataset's columns", file=label, field="columns")
    missing = [f"{k}: {v!r}" for k, v in given.items() if v not in names]
    if missing:
        raise DataError("missing_column", f"columns maps {', '.join(missing)}, but the dataset has no such column; "
                        f"its columns: {', '.join(names)}", "map each field to one of the dataset's columns",
                        file=label, field="columns")
    cols = {f: c for f, c in given.items() if c}
    for f in FIELDS:
        # a mapped question means VQA rows, even when the table also has a messages column
        if f not in given and f in names and not (f == "messages" and "question" in given):
            cols[f] = f
    # preference rows: the prompt (messages or question) answered by the chosen and rejected columns
    answers = ("chosen", "rejected") if {"chosen", "rejected"} & set(cols) else ("answer",)
    if "messages" not in cols and not {"question", *answers} <= set(cols):
        lacking = [f for f in ("question", *answers) if f not in cols]
        raise DataError("missing_column", f"no column for {' and '.join(lacking)} (and no messages column); the "
                        f"dataset's columns: {', '.join(names)}",
                        "map them, e.g. columns: {image: img, question: q, answer: a}, or map messages to a "
                        "column of chats in our format", file=label, field="columns")
    return cols


# ---- media -----------------------------------------------------------------------------------
class MediaProblem(Exception):
    """An embedded image or audio that cannot be used: (kind, problem, and the fix when it is specific)."""

    def __init__(self, kind: str, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.kind = kind
        self.fix = fix


class MediaStore:
    """Content-addressed files of embedded media: each is decode-checked and written once."""

    def __init__(self, folder: Path, base_dir: Path, allow_outside_paths: bool, root: Path | None = None) -> None:
        self.folder = Path(folder)
        self.base = Path(base_dir).resolve()
        # the folder media paths must stay inside: the dataset's folder, or for a hub snapshot the
        # repo's cache folder (a snapshot's files are links into its blobs/)
        self.root = Path(root).resolve() if root is not None else self.base
        self.allow_outside = allow_outside_paths
        self.written = self.reused = 0

    def path_of(self, kind: str, value: Any, array_dtype: Any = None) -> str:
        """The file of an embedded or referenced image/audio value (absolute path as a string)."""
        if isinstance(value, memoryview):
            value = value.tobytes()
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return self.path_of(kind, value["bytes"])
            if kind == "audio" and value.get("array") is not None:
                return self._audio_array(value["array"], value.get("sampling_rate"), array_dtype)
            if value.get("path"):
                return self.reference(value["path"])
            raise MediaProblem(f"unreadable_{kind}", f"the {kind} value has neither bytes nor a path"
                               + (" nor an array" if kind == "audio" else ""))
        if isinstance(value, (bytes, bytearray)):
            return self._media_bytes(bytes(value), kind)
        if isinstance(value, (str, os.PathLike)):
            return self.reference(value)
        if kind == "audio" and isinstance(value, (list, np.ndarray)):
            raise MediaProblem("unreadable_audio", "the audio is an array without a sampling rate; store it as "
                               "{array, sampling_rate} (or as the datasets Audio feature)")
        raise MediaProblem(f"unreadable_{kind}", f"the {kind} value is {type(value).__name__}; expected bytes, "
                           "{bytes, path}" + (", {array, sampling_rate}" if kind == "audio" else "") + " or a path")

    def reference(self, value: str | os.PathLike) -> str:
        """A media path of the dataset, relative to its folder, with the dataset-folder containment
        check (data.allow_outside_paths) done here: the files written by the store live elsewhere."""
        text = os.fspath(value)
        if not text.strip():
            raise MediaProblem("bad_part", "the media path is empty")
        full = (self.base / Path(text).expanduser()).resolve()
        if not self.allow_outside:
            try:
                full.relative_to(self.root)
            except ValueError:
                raise MediaProblem("outside_path", f"path '{text}' resolves to '{full}', outside the dataset folder "
                                   f"'{self.root}' (move it there, or set data.allow_outside_paths: true)") from None
        return str(full)

    def _final(self, digest: str, suffix: str) -> Path | None:
        path = self.folder / f"{digest}{suffix}"
        if path.is_file():
            self.reused += 1
            return path
        return None

    def _publish(self, data_writer, suffix: str, digest: str, check) -> str:
        """Write to a temporary file, decode-check it, then rename it to its content address."""
        final = self.folder / f"{digest}{suffix}"
        with fsutil.atomic_path(final) as tmp:  # removed when the write or the check fails
            data_writer(str(tmp))
            check(tmp)
        self.written += 1
        return str(final)

    def _media_bytes(self, data: bytes, kind: str) -> str:
        """An embedded image or audio file: published once under its content hash, after the
        full decode training does (a truncated file fails here, named by its row)."""

        digest = hashlib.sha256(data).hexdigest()
        suffix = _image_suffix(data) if kind == "image" else _audio_suffix(data)
        done = self._final(digest, suffix)
        if done is not None:
            return str(done)

        def check(tmp: Path):
            try:
                media.load_image(tmp) if kind == "image" else media.load_audio(tmp, sampling_rate=None)
            except media.MediaError as e:
                refused = getattr(e, "kind", None) in ("too_large", "out_of_memory")
                raise MediaProblem(getattr(e, "kind", None) or f"unreadable_{kind}",
                                   f"the embedded {kind} ({len(data)} bytes) "
                                   f"{'is refused' if refused else 'does not decode'}: "
                                   + str(e).replace(f" '{tmp}'", ""), getattr(e, "fix", None)) from None

        return self._publish(lambda tmp: Path(tmp).write_bytes(data), suffix, digest, check)

    def _audio_array(self, array: Any, rate: Any, dtype: Any) -> str:
        arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise MediaProblem("unreadable_audio", f"the audio array's sampling_rate is {rate!r}; it must be a "
                               "positive whole number of samples per second")
        if arr.dtype.kind == "i" and arr.dtype not in _PCM:
            # python ints (no dtype stored with them): 16-bit PCM when they fit
            if arr.size and int(np.abs(arr).max()) > 32767:
                raise MediaProblem("unreadable_audio", "the audio array holds integers beyond 16-bit PCM; store "
                                   "float samples in [-1, 1] (or int16/int32 arrays)")
            arr = arr.astype(np.int16)
        if arr.dtype.kind not in "fiu" or (arr.dtype.kind in "iu" and arr.dtype not in _PCM):
            raise MediaProblem("unreadable_audio", f"the audio array has dtype {arr.dtype}; store float samples in "
                               "[-1, 1] or int16/int32 PCM")
        if arr.ndim == 2 and arr.shape[0] < arr.shape[1]:
            arr = arr.T  # (channels, samples) -> (samples, channels), what soundfile writes
        if arr.ndim not in (1, 2) or arr.shape[0] == 0:
            raise MediaProblem("empty_audio" if arr.size == 0 else "unreadable_audio",
                               f"the audio array has shape {arr.shape}; expected (samples,) or (samples, channels)")
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
            bad = ~np.isfinite(arr)
            if bad.any():
                raise MediaProblem("non_finite", f"the audio array holds {int(bad.sum())} NaN or infinite sample(s); "
                                   "replace them (e.g. numpy.nan_to_num)")
        arr = np.ascontiguousarray(arr)
        head = f"{int(rate)}:{arr.dtype.str}:{arr.shape}".encode()
        digest = hashlib.sha256(head + arr.tobytes()).hexdigest()
        done = self._final(digest, ".wav")
        if done is not None:
            return str(done)

        def write(tmp: str):
            import soundfile as sf

            # float arrays as 32-bit float WAV: the loader reads back exactly these values
            sf.write(tmp, arr, int(rate), subtype=_PCM.get(arr.dtype, "FLOAT"), format="WAV")

        return self._publish(write, ".wav", digest, lambda tmp: None)


def _image_suffix(data: bytes) -> str:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return ".dcm"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in _IMAGE_MAGIC:
        if data.startswith(magic):
            return suffix
    return ".img"  # Pillow identifies the format from the content; the decode check names a failure


def _audio_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav"
    for magic, suffix in _AUDIO_MAGIC:
        if data.startswith(magic):
            return suffix
    return ".audio"


# ---- rows ------------------------------------------------------------------------------------
def _numeric_list(t) -> bool:
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        return pa.types.is_integer(v) or pa.types.is_floating(v) or _numeric_list(v)
    if pa.types.is_struct(t):
        return any(_numeric_list(t.field(i).type) for i in range(t.num_fields))
    return False


def _scalar_value(s):
    """An Arrow scalar as Python values, except that lists of numbers stay numpy arrays of their
    stored dtype (int16 audio stays int16; `as_py` would give Python ints without a dtype)."""
    import pyarrow as pa

    t = s.type
    if not s.is_valid:
        return None
    if pa.types.is_struct(t):
        return {t.field(i).name: _scalar_value(s[t.field(i).name]) for i in range(t.num_fields)}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        if pa.types.is_integer(v) or pa.types.is_floating(v):
            return s.values.to_numpy(zero_copy_only=False)
        return [_scalar_value(x) for x in s.values]
    return s.as_py()


def iter_rows(ds, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(0-based index, {column: value}) of every row, read as stored (Arrow): embedded images and
    audio come as bytes / {bytes, path} / {array, sampling_rate}, never decoded by `datasets`."""
    table = ds.select_columns(columns).with_format("arrow")
    for start in range(0, len(ds), _BATCH):
        batch = table[start:start + _BATCH]
        values = {}
        for name in columns:
            col = batch.column(name)
            values[name] = [_scalar_value(x) for x in col] if _numeric_list(col.type) else col.to_pylist()
        for k in range(batch.num_rows):
            yield start + k, {name: values[name][k] for name in columns}


def _listify(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def _text(value, column: str, *, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _RowError("bad_column", f"column {column!r}", f"column {column!r} is {'empty' if value else 'null'}",
                            "fill it in, or drop the row")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise _RowError("bad_column", f"column {column!r}", f"column {column!r} holds {type(value).__name__}, not text",
                        "map a column of strings")
    return str(value)


class _RowError(Exception):
    def __init__(self, kind: str, fld: str, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.kind, self.fld, self.problem, self.fix = kind, fld, problem, fix


_MEDIA_FIX = {"outside_path": "move the file under the dataset folder, or set data.allow_outside_paths: true",
              "empty_audio": "replace the recording with a non-empty one, or drop the row",
              "non_finite": "replace the NaN/infinite values, or drop the row"}


def _media(store: MediaStore, kind: str, value, fld: str, dtype=None) -> str:
    try:
        return store.path_of(kind, value, dtype)
    except MediaProblem as e:
        fix = e.fix or _MEDIA_FIX.get(e.kind, "re-encode the image as PNG or JPEG, or drop the row" if kind == "image"
                                      else "re-encode the audio as WAV or FLAC, or drop the row")
        raise _RowError(e.kind, fld, str(e), fix) from None


def _vqa_row(row: dict, cols: dict, store: MediaStore, dtypes: dict) -> dict:
    content: list[dict] = []
    for kind in ("image", "audio"):
        if kind in cols:
            for v in _listify(row[cols[kind]]):
                content.append({"type": kind, "path": _media(store, kind, v, f"column {cols[kind]!r}",
                                                             dtypes.get(kind))})
    content.append({"type": "text", "text": _text(row[cols["question"]], cols["question"], required=True)})
    pair = _pair(row, cols)
    answer = _text(row[cols["answer"]], cols["answer"], required=not pair) if "answer" in cols else None
    messages = [{"role": "user", "content": content}] + ([] if pair else [{"role": "assistant", "content": answer}])
    system = _text(row[cols["system"]], cols["system"], required=False) if "system" in cols else None
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, **({"answer": answer} if answer is not None else {}), **pair}


def _pair(row: dict, cols: dict) -> dict:
    """A preference row's chosen and rejected answers (text, or our parts / an assistant message as
    JSON-like values), as top-level keys that parse_sample appends to the prompt; {} for other rows."""
    out = {}
    for key in ("chosen", "rejected"):
        if key in cols:
            value = row[cols[key]]
            out[key] = _text(value, cols[key], required=True) if isinstance(value, str) or value is None else value
    return out


def _chat_row(row: dict, cols: dict, store: MediaStore, dtypes: dict) -> dict:
    col = cols["messages"]
    messages = row[col]
    if isinstance(messages, str):
        try:
            messages = loads_bounded(messages)
        except UnsafeJsonError as e:
            raise _RowError(e.kind, f"column {col!r}", str(e), "store the chat as a list of {role, content} "
                            "messages, a few levels deep, with valid Unicode text") from None
        except json.JSONDecodeError as e:
            raise _RowError("json", f"column {col!r}", f"the messages text is not JSON: {e.msg} at column {e.colno}",
                            "store the chat as a list of {role, content}, or as its JSON text") from None
        except ValueError as e:  # e.g. an integer of over 4300 digits
            raise _RowError("json", f"column {col!r}", f"the messages text is unreadable JSON: {e}",
                            "store the chat as a list of {role, content}, or as its JSON text") from None
    if not isinstance(messages, list):
        raise _RowError("bad_messages", f"column {col!r}", f"the messages are {type(messages).__name__}, not a list",
                        "store the chat as a list of {role, content} messages")
    pending = {k: _listify(row[cols[k]]) for k in ("image", "audio") if k in cols}
    used = {k: 0 for k in pending}
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.append(msg)  # parse_sample names the problem
            continue
        msg = {k: v for k, v in msg.items() if v is not None}  # Arrow gives every struct key, absent ones null
        content = msg.get("content")
        if isinstance(content, list):
            msg["content"] = [_chat_part(p, f"messages[{i}].content[{j}]", pending, used, cols, store, dtypes)
                              for j, p in enumerate(content)]
        out.append(msg)
    for kind, items in pending.items():
        if used[kind] < len(items):
            raise _RowError("media_count", f"column {cols[kind]!r}",
                            f"column {cols[kind]!r} holds {len(items)} {kind}(s), the messages use {used[kind]}",
                            f"add a {{\"type\": \"{kind}\"}} part for each, or drop the extra ones")
    obj: dict = {"messages": out, **_pair(row, cols)}
    if "system" in cols:
        system = _text(row[cols["system"]], cols["system"], required=False)
        if system and not (out and isinstance(out[0], dict) and out[0].get("role") == "system"):
            out.insert(0, {"role": "system", "content": system})
    if "answer" in cols:
        answer = _text(row[cols["answer"]], cols["answer"], required=False)
        if answer is not None:
            obj["answer"] = answer
    return obj


def _chat_part(part, fld: str, pending: dict, used: dict, cols: dict, store: MediaStore, dtypes: dict):
    if not isinstance(part, dict):
        return part
    part = {k: v for k, v in part.items() if v is not None}
    kind = part.get("type")
    if kind not in ("image", "audio", "video"):
        return part
    for key in (kind, "bytes", "data"):
        if key in part and kind != "video":
            embedded = part.pop(key)
            part["path"] = _media(store, kind, embedded, f"{fld}.{key}")
            return part
    if "path" in part:
        part["path"] = _media(store, kind, part["path"], f"{fld}.path") if kind != "video" else \
            _reference(store, part["path"], f"{fld}.path")
        return part
    if "frames" in part and isinstance(part["frames"], list):
        part["frames"] = [_reference(store, f, f"{fld}.frames[{k}]") for k, f in enumerate(part["frames"])]
        return part
    if kind in pending:
        items = pending[kind]
        if used[kind] >= len(items):
            raise _RowError("media_count", fld, f"the messages have more {kind} parts than column "
                            f"{cols[kind]!r} holds ({len(items)})", f"give each {kind} part its {kind}")
        part["path"] = _media(store, kind, items[used[kind]], f"column {cols[kind]!r}", dtypes.get(kind))
        used[kind] += 1
    return part  # without a path: parse_sample says what is missing


def _reference(store: MediaStore, value, fld: str) -> str:
    try:
        return store.reference(value) if isinstance(value, (str, os.PathLike)) else value
    except MediaProblem as e:
        raise _RowError(e.kind, fld, str(e), _MEDIA_FIX.get(e.kind, "")) from None


def _array_dtypes(ds, cols: dict) -> dict:
    """The stored dtype of `{array, sampling_rate}` audio columns (a list column of int16 stays int16)."""
    out = {}
    if "audio" in cols:
        feat = ds.features.get(cols["audio"])
        feat = getattr(feat, "feature", feat)  # a list of audios
        inner = feat.get("array") if isinstance(feat, dict) else None
        dtype = getattr(getattr(inner, "feature", None), "dtype", None)
        if dtype:
            out["audio"] = np.dtype(dtype)
    return out


def load_hf_samples(src: Any, *, source_for_messages: str = "", on_error: str = "raise",
                    allow_outside_paths: bool = False, media_dir: Path) -> tuple[list[Sample], list[DataError]]:
    """Every row of a Parquet / save_to_disk / hub source as a validated `Sample`, and the errors of
    the rows that are not (`on_error="raise"` raises the first). A problem of the source itself (it
    cannot be read, a mapped column is missing) raises a DataError whatever `on_error` says.
    `source_for_messages` replaces the source's label (its path, or hub id and split) in messages."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    dataset, label, base_dir, root = open_dataset(src)
    label = source_for_messages or label
    cols = column_map(src, list(dataset.column_names), label)
    store = MediaStore(media_dir, base_dir, allow_outside_paths, root=root)
    dtypes = _array_dtypes(dataset, cols)
    build = _chat_row if "messages" in cols else _vqa_row
    samples: list[Sample] = []
    errors: list[DataError] = []
    for index, row in iter_rows(dataset, sorted(set(cols.values()))):
        n = index + 1
        try:
            try:
                obj = build(row, cols, store, dtypes)
            except _RowError as e:
                raise DataError(e.kind, e.problem, e.fix, file=label, line=n, field=f"row {n}: {e.fld}") from None
            for key in ("id", "task"):
                if key in cols and row[cols[key]] is not None:
                    obj[key] = str(row[cols[key]])
            try:
                # media paths are absolute by now and were checked against the dataset folder above
                sample = parse_sample(obj, source=label, line=n, base_dir=base_dir, allow_outside_paths=True)
            except DataError as e:
                raise DataError(e.kind, e.problem, e.fix, file=label, line=n,
                                field=f"row {n}: {e.field}" if e.field else f"row {n}") from None
        except DataError as e:
            if on_error == "raise":
                raise
            errors.append(e)
            continue
        samples.append(sample)
    return samples, errors
