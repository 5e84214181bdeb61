"""``data convert`` (also ``python -m finetune.data.convert``): a table through a template, or
another tool's dataset, written as our JSONL or as a LLaMA-Factory ShareGPT list."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from finetune.data.convert.files import FORMATS, convert_file
from finetune.data.convert.llamafactory import llamafactory_dataset_info, write_llamafactory
from finetune.data.convert.records import _MEDIA_COLUMN, ConvertResult, write_jsonl
from finetune.data.convert.table import convert_table
from finetune.data.schema import MEDIA_TYPES, DataError


def _parse_roles(items: list[str]) -> dict[str, str]:
    roles = {}
    for item in items:
        name, sep, role = item.partition("=")
        if not sep or not name or role not in ("user", "assistant", "system"):
            raise DataError("usage", f"bad --role {item!r}", "write --role NAME=user|assistant|system")
        roles[name] = role
    return roles


def _print_result(result: ConvertResult, out: Path, n_written: int, outside: int, what: str) -> None:
    kinds: Counter = Counter()
    for s in result.samples:
        for m in s["messages"]:
            if isinstance(m.get("content"), list):
                kinds.update(p["type"] for p in m["content"] if p["type"] in MEDIA_TYPES)
    media = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items()) or "no media"
    print(f"converted {result.source} ({result.format}): {result.n_records} records, "
          f"{n_written} samples written to {out} as {what} ({media}), {len(result.errors)} skipped")
    if result.errors:
        for e in result.errors[:50]:
            print(f"  skipped: {e}", file=sys.stderr)
        if len(result.errors) > 50:
            print(f"  ... and {len(result.errors) - 50} more", file=sys.stderr)
        print("skipped by kind: " + ", ".join(f"{k} {n}" for k, n in result.error_counts().items()))
    if outside:
        print(f"note: {outside} media path(s) lie outside {out.parent}; `data check` rejects them unless "
              "--allow-outside-paths (data.allow_outside_paths: true). Write the output next to the media "
              "to avoid this.")


def main(argv: list[str] | None = None) -> int:
    """``data convert``: a table through a template, or another tool's format, into our JSONL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m finetune data convert",
        description="Convert a CSV/JSONL table (with --template) or a LLaMA-Factory / ms-swift / OpenAI "
                    "dataset (with --from) into our JSONL format. Media paths are written relative to "
                    "the output file's folder.")
    parser.add_argument("input", type=Path,
                        help="the table or dataset file, or a LLaMA-Factory dataset as dataset_info.json#name")
    parser.add_argument("output", type=Path, help="the JSONL file to write (or .json with --to llamafactory)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--template", "-t", type=Path, help="a template YAML (see data_templates/templates/)")
    src.add_argument("--from", dest="fmt", choices=("auto",) + FORMATS, default="auto",
                     help="the input's format (default: auto-detect)")
    parser.add_argument("--to", choices=("ours", "llamafactory"), default="ours",
                        help="write our JSONL (default) or a LLaMA-Factory ShareGPT JSON list")
    parser.add_argument("--media-root", type=Path,
                        help="resolve relative media paths against this folder (default: the input's folder)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="stop at the first bad record (default) or skip and count bad records")
    parser.add_argument("--role", action="append", default=[], metavar="NAME=ROLE",
                        help="map an extra role name, e.g. --role doctor=assistant (repeatable)")
    parser.add_argument("--no-check-files", action="store_true", help="do not require media files to exist")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.template is not None:
            result = convert_table(args.template, args.input, media_root=args.media_root,
                                   on_error=args.on_error, check_files=not args.no_check_files)
        else:
            result = convert_file(args.input, args.fmt, media_root=args.media_root, on_error=args.on_error,
                                  check_files=not args.no_check_files, role_map=_parse_roles(args.role))
        if not result.samples:
            for e in result.errors[:50]:
                print(f"  skipped: {e}", file=sys.stderr)
            print(f"error: no record of {result.source} could be converted "
                  f"({', '.join(f'{k} {n}' for k, n in result.error_counts().items())}); nothing written",
                  file=sys.stderr)
            return 1
        if args.to == "llamafactory":
            n = write_llamafactory(result.samples, args.output)
            _print_result(result, args.output, n, 0, "LLaMA-Factory ShareGPT")
            used = {p["type"] for s in result.samples for m in s["messages"]
                    if isinstance(m.get("content"), list) for p in m["content"]}
            cols = [col for kind, col in _MEDIA_COLUMN.items() if kind in used]
            entry = {args.output.stem: llamafactory_dataset_info(args.output, cols)}
            print("dataset_info.json entry:\n" + json.dumps(entry, indent=2))
        else:
            outside = write_jsonl(result.samples, args.output)
            _print_result(result, args.output, len(result.samples), outside, "JSONL")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
