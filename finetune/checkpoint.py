"""Safetensors checkpoints written by us: sharded, indexed, deterministic, streamed.

Exports assemble a checkpoint from two sources (the merged model we trained and the parts of
the base we did not touch, such as Qwen2.5-Omni's talker and token2wav), so they write the
shards themselves instead of calling `save_pretrained` on one module:

* tensors are read lazily from the source files (`TensorSource`), so a 7B base never has to
  be in memory twice, and untouched tensors are copied with their exact bytes and dtype;
* shards are filled in name order up to `max_shard_size` and always come with a
  `model.safetensors.index.json` (one shard included), which every loader understands;
* nothing time- or machine-dependent is written: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import ConfigError, MissingFileError

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' / '5G' / '500MB' / '2GiB' / '500' / 1000 -> bytes (decimal units, as transformers uses
    them; 'i' for binary ones). The one reader of export.max_shard_size: the recipe's check uses it."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"export.max_shard_size {text!r}: expected a size such as 2GB, 500MB or 5GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index((m.group(2) or " ").upper())
    return int(float(m.group(1)) * base ** power)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (via its index when there is one)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


@dataclass
class TensorSource:
    """One tensor of a checkpoint on disk, read only when written."""

    file: Path
    key: str

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self.key)


def tensors_of(folder: Path) -> dict[str, TensorSource]:
    """name -> lazily read tensor, for every tensor of a checkpoint folder."""
    from safetensors import safe_open

    out: dict[str, TensorSource] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = TensorSource(path, k)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_sharded(tensors: dict[str, "torch.Tensor | TensorSource"], out_dir: Path, max_shard_size: str | int,
                  prefix: str = "model") -> list[str]:
    """Write `tensors` (sorted by name) as prefix-0000i-of-0000n.safetensors plus the index.

    Returns the written file names. Tensors are made contiguous; a TensorSource is read when
    its shard is written, so memory holds one shard at a time.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    names = sorted(tensors)
    # plan shards from sizes without loading: a TensorSource's size comes from its header
    sizes = {n: _size_of(tensors[n]) for n in names}
    shards: list[list[str]] = [[]]
    filled = 0
    for n in names:
        if shards[-1] and filled + sizes[n] > limit:
            shards.append([])
            filled = 0
        shards[-1].append(n)
        filled += sizes[n]
    total = len(shards)
    weight_map: dict[str, str] = {}
    written = []
    for i, group in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{total:05d}.safetensors"
        data = {}
        for n in group:
            t = tensors[n]
            t = t.load() if isinstance(t, TensorSource) else t
            data[n] = t.detach().to("cpu").contiguous()
            weight_map[n] = fname
        save_file(data, str(Path(out_dir) / fname), metadata={"format": "pt"})
        written.append(fname)
        del data
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written + [INDEX_NAME]


def _size_of(t: "torch.Tensor | TensorSource") -> int:
    if isinstance(t, TensorSource):
        from safetensors import safe_open

        with safe_open(str(t.file), framework="pt") as f:
            sl = f.get_slice(t.key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
        n = 1
        for d in shape:
            n *= d
        return n * _DTYPE_BYTES[dtype]
    return _nbytes(t)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def raw_equal(a: TensorSource, b: TensorSource) -> bool:
    """Same dtype, shape and bytes (bit-identical, NaNs included)."""
    x, y = a.load(), b.load()
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return bool(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))  # 0-dim too


@dataclass(frozen=True)
class Assembled:
    """What `assemble` wrote."""

    files: list[str]  # the shards and the index, in order
    trained_tensors: int  # tensors written from the trained model
    kept_tensors: list[str]  # base tensors copied unchanged, sorted


def assemble(stage: Path, base: Path, out_dir: Path, *, prefix: str, max_shard_size: str | int) -> Assembled:
    """Write the trained model (saved in `stage`) back into the layout of the base checkpoint.

    Every tensor of `stage` is written under its base name (`prefix + name` unless the name is
    already the base's); every tensor of the base that the
    trained model does not provide (Qwen2.5-Omni's talker and token2wav, say) is copied
    unchanged. Refuses when a trained name is not in the base: that would mean the two use
    different names and the export would hold both.
    """
    base_t = tensors_of(base)
    staged = tensors_of(stage)
    # transformers writes a model loaded with a key_mapping back under the checkpoint's names
    # (then the prefix is already there); a model loaded plainly gets the prefix from us
    as_is = all(k in base_t for k in staged)
    trained = {(k if as_is else prefix + k): v for k, v in staged.items()}
    unknown = sorted(k for k in trained if k not in base_t)
    if unknown:
        raise ConfigError(f"{len(unknown)} trained tensor(s) are not in the base checkpoint {base}, e.g. "
                         f"{unknown[:3]}: the trained model's parameter names differ from the checkpoint's")
    kept = {k: v for k, v in base_t.items() if k not in trained}
    files = write_sharded({**trained, **kept}, out_dir, max_shard_size)
    return Assembled(files=files, trained_tensors=len(trained), kept_tensors=sorted(kept))


def copy_extras(base: Path, out_dir: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the base folder's non-weight files (processor, speaker dictionaries, ...) unchanged.

    Weights, hidden files, the base's README and names in `skip` are not copied; files already
    in `out_dir` are kept.
    """
    import fnmatch
    import shutil

    copied = []
    for p in sorted(Path(base).iterdir()):
        name = p.name
        if name.startswith(".") or name in skip or name == "README.md":
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in WEIGHT_PATTERNS):
            continue
        dst = Path(out_dir) / name
        if dst.exists():
            continue
        if p.is_dir():
            shutil.copytree(p, dst)
        else:
            shutil.copyfile(p, dst)  # contents only: no timestamps carried over
        copied.append(name)
    return copied
