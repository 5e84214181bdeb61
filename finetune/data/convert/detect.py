"""Which format a record or a file is in, judged from the first records: ``ours``,
``llamafactory``, ``swift`` or ``openai``, and preference data (chosen/rejected answers in any of the
forms LLaMA-Factory, ms-swift or we write), which is refused with one error for the file."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.convert.llamafactory import _is_v1, dataset_ref
from finetune.data.convert.openai import _OPENAI_PART_TYPES
from finetune.data.convert.preference import UNPAIRED, split_pair
from finetune.data.convert.records import _MEDIA_COLUMN, _PREFERENCE_FIX, _TAG_RE, _Loc, _read_records
from finetune.data.schema import PART_TYPES, DataError

_FORMAT_NAMES = {
    "ours": "our JSONL format",
    "llamafactory": "LLaMA-Factory's format (sharegpt/alpaca with <image> placeholders, or v1 parts with 'value')",
    "swift": "ms-swift's format (media columns without placeholders, or query/response)",
    "openai": "OpenAI's chat format (image_url/input_audio parts)",
}


def _preference_form(obj: Any) -> str | None:
    """The preference form a record is in (answers ranked, not one answer to learn), or None."""
    if not isinstance(obj, dict):
        return None
    if "chosen_messages" in obj and "rejected_messages" in obj:
        return "LLaMA-Factory v1: chosen_messages + rejected_messages"
    if "rejected_response" in obj:
        return "ms-swift: rejected_response"
    if "kto_tag" in obj or ("messages" in obj and isinstance(obj.get("label"), bool)):
        # desirable/undesirable answers: supervised fine-tuning would learn the undesirable ones too
        return f"KTO feedback: {'kto_tag' if 'kto_tag' in obj else 'messages + label true/false'}"
    if "chosen" in obj and "rejected" in obj:
        for key, form in (("conversations", "LLaMA-Factory sharegpt ranking: conversations + chosen + rejected"),
                          ("instruction", "LLaMA-Factory alpaca ranking: instruction + chosen + rejected"),
                          ("messages", "messages + chosen + rejected"),
                          ("prompt", "prompt + chosen + rejected")):
            if key in obj:
                return form
        return "chosen + rejected"
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and {"chosen", "rejected"} <= set(msgs[-1]):
        return "a last turn with chosen + rejected"
    return None


def _unpaired_form(obj: Any) -> str | None:
    """The preference form of a record that is not read as a pair (KTO feedback, TRL's prompt +
    chosen + rejected), or None."""
    form = _preference_form(obj)
    if form is None or form == "a last turn with chosen + rejected":
        return None
    if not form.startswith(UNPAIRED):
        try:
            if split_pair(obj, _Loc("", 0)) is not None:
                return None
        except DataError:
            return None  # a pair with a problem: its converter names it
    return form


def _preference_error(head: list[tuple[_Loc, Any]], source: str) -> DataError | None:
    """One error for a file whose first records are mostly preference data that is not read as
    pairs (KTO feedback), instead of one per record."""
    records = [obj for _, obj in head if not isinstance(obj, DataError)]
    forms = [f for f in map(_unpaired_form, records) if f]
    if not forms or 2 * len(forms) <= len(records):
        return None
    return DataError("preference_data", f"the file holds preference data ({forms[0]}), not chat samples for "
                     "supervised fine-tuning", _PREFERENCE_FIX, file=source)


def _classify(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if _unpaired_form(obj):
        return "preference"
    try:
        pair = split_pair(obj, _Loc("", 0))
    except DataError:
        pair = None
    if pair is not None:  # a pair of another tool: the format of its conversations
        return _classify(pair[0])
    if "conversations" in obj or ("instruction" in obj and "output" in obj):
        return "llamafactory"
    if "query" in obj and "response" in obj:
        return "swift"
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return None
    if _is_v1(obj):
        return "llamafactory"
    types = {p.get("type") for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), list)
             for p in m["content"] if isinstance(p, dict)}
    if types & set(_OPENAI_PART_TYPES):
        return "openai"
    media_cols = [c for c in _MEDIA_COLUMN.values() if obj.get(c)]
    tagged = any(isinstance(m, dict) and isinstance(m.get("content"), str) and _TAG_RE.search(m["content"])
                 for m in msgs)
    if media_cols or tagged:
        # Only ms-swift accepts media without any placeholder; a partial mismatch is
        # left to the LLaMA-Factory converter, which reports it.
        return "llamafactory" if tagged else "swift"
    if any(isinstance(m, dict) and "from" in m and "role" not in m for m in msgs):
        return "llamafactory"
    if types and not types <= set(PART_TYPES):
        return None
    return "ours"


def _detect(head: list[tuple[_Loc, Any]], source: str) -> str:
    records = [obj for _, obj in head if not isinstance(obj, DataError)]
    votes = Counter(map(_classify, records))
    for fmt in ("openai", "swift", "llamafactory", "ours"):
        if votes[fmt]:
            return fmt
    n = len(records)
    raise DataError("unknown_format",
                    f"could not recognise the format from the first {n} record{'s' if n != 1 else ''}",
                    "pass --from llamafactory|swift|openai|ours, or --template for a table", file=source)


def _head(records: Iterator[tuple[_Loc, Any]], n: int) -> list[tuple[_Loc, Any]]:
    """The first `n` records that parsed (and the broken ones among them)."""
    head, good = [], 0
    for loc, obj in records:
        head.append((loc, obj))
        good += not isinstance(obj, DataError)
        if good >= n:
            break
    return head


def detect_format(path: str | os.PathLike, *, max_records: int = 50) -> str:
    """``"ours"``, ``"llamafactory"``, ``"swift"`` or ``"openai"``, judged from the first records.

    Text-only chat records are valid in every format and are reported as
    ``"ours"``; LLaMA-Factory's v1 records and `dataset_info.json#name` are ``"llamafactory"``.
    Raises :class:`DataError` when no record matches any format.
    """
    if dataset_ref(path):
        return "llamafactory"
    return _detect(_head(_read_records(Path(path)), max_records), str(path))


def dominant_format(path: str | os.PathLike, *, max_records: int = 200) -> str:
    """The format most of the first records are in ("ours" on a tie or when nothing matches;
    "preference" for preference data).

    Unlike `detect_format`, one odd record does not decide: a broken line of our own format
    (say, with ShareGPT 'conversations') is then reported as broken, not reinterpreted.
    """
    votes: Counter = Counter()
    try:
        for k, (_, obj) in enumerate(_read_records(Path(path))):
            if k >= max_records:
                break
            if not isinstance(obj, DataError):
                votes[_classify(obj) or "unknown"] += 1
    except (DataError, ValueError, OSError):
        return "ours"
    others = {f: n for f, n in votes.items() if f not in ("ours", "unknown")}
    if others and sum(others.values()) > votes["ours"]:
        return max(others, key=others.get)
    return "ours"
