"""Our own JSONL format, read again through :func:`finetune.data.schema.parse_sample` (and written
back with media paths relative to the output). A record of another format is refused here: our
parser would keep its media columns as plain metadata and lose the files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.convert.detect import _FORMAT_NAMES, _classify, _preference_form
from finetune.data.convert.records import _PREFERENCE_FIX, _Loc, sample_to_dict
from finetune.data.schema import DataError, parse_sample


def _convert_ours(obj: Any, loc: _Loc, *, base: Path, check_files: bool, role_map,
                  within: Path | None = None) -> dict:
    """A record of our format -> our sample (media paths absolute)."""
    other = _classify(obj)
    if other == "preference":
        raise loc.err("preference_data", "", f"the record is preference data ({_preference_form(obj)})",
                      _PREFERENCE_FIX)
    if other not in (None, "ours"):
        # our parser would keep another format's media columns as plain metadata and lose the files
        raise loc.err("other_format", "", "the record is not in our format",
                      f"it looks like {_FORMAT_NAMES[other]}, which --from {other} reads")
    try:
        sample = parse_sample(obj, source=loc.file, line=loc.line, base_dir=base,
                              allow_outside_paths=within is None, check_files=check_files)
    except DataError as e:
        raise loc.relocate(e) from None
    return sample_to_dict(sample)
