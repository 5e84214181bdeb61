"""Preference records of other tools as our preference form (a last assistant turn with `chosen`
and `rejected` answers): each record is split into the conversation that ends with the chosen
answer and the one that ends with the rejected answer, both are converted by the record's own
converter (so media columns and placeholders are read as for chat data), and the two results are
joined again after checking that their prompts are the same.

Forms read (finetune.data.convert.detect._preference_form names them):

- LLaMA-Factory sharegpt ranking: ``conversations`` (or ``messages``) ending with the user's turn,
  ``chosen`` and ``rejected`` answer turns (``{"from": "gpt", "value": ...}`` or strings), media in
  ``images``/``audios``/``videos``; its alpaca ranking (``instruction`` + ``chosen``/``rejected``);
- LLaMA-Factory v1: ``chosen_messages`` and ``rejected_messages``, two whole conversations whose
  turns before the last must be the same;
- ms-swift: ``messages`` ending with the chosen answer, plus ``rejected_response``.
"""

from __future__ import annotations

from typing import Any, Callable

from finetune.data.convert.records import _Loc, _type_name, _validate

#: preference forms that are not pairs (KTO's desirable/undesirable answers): still refused
UNPAIRED = "KTO feedback"


def split_pair(obj: Any, loc: _Loc) -> tuple[dict, dict] | None:
    """(the chosen record, the rejected record) of a preference record of another tool, each a
    chat record of that tool's format; None when `obj` is no such record (ours, chat data)."""
    if not isinstance(obj, dict):
        return None
    rest = {k: v for k, v in obj.items() if k not in ("chosen", "rejected", "chosen_messages", "rejected_messages",
                                                       "rejected_response")}
    if "chosen_messages" in obj and "rejected_messages" in obj:
        for key in ("chosen_messages", "rejected_messages"):
            if not isinstance(obj[key], list) or not obj[key]:
                raise loc.err("bad_pair", key, f"'{key}' is {_type_name(obj[key])}, not a list of turns",
                              f"give '{key}' as the whole conversation ending with the "
                              f"{key.split('_')[0]} answer")
        return {**rest, "messages": obj["chosen_messages"]}, {**rest, "messages": obj["rejected_messages"]}
    if "rejected_response" in obj:
        msgs = obj.get("messages")
        if "response" in obj:  # query/response
            return rest | {"response": obj["response"]}, rest | {"response": obj["rejected_response"]}
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            raise loc.err("bad_pair", "messages", "the record has 'rejected_response' but no 'messages' ending "
                          "with the chosen answer", "end 'messages' with the chosen assistant turn")
        last = msgs[-1]
        ckey = "content" if "content" in last else "value"
        return rest, {**rest, "messages": msgs[:-1] + [{**last, ckey: obj["rejected_response"]}]}
    if "chosen" in obj and "rejected" in obj:
        if "instruction" in obj:  # alpaca ranking: the answers are the output
            return {**rest, "output": obj["chosen"]}, {**rest, "output": obj["rejected"]}
        key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
        if key is None or not isinstance(obj[key], list):
            return None  # another form (TRL's prompt + chosen + rejected): left to the refusal
        return {**rest, key: obj[key] + [_turn(obj, "chosen", key, loc)]}, \
            {**rest, key: obj[key] + [_turn(obj, "rejected", key, loc)]}
    return None


def _turn(obj: dict, which: str, key: str, loc: _Loc) -> dict:
    """An answer of a ranking record as a turn of its conversation (sharegpt from/value or role/content)."""
    answer = obj[which]
    if isinstance(answer, str):
        return {"from": "gpt", "value": answer} if key == "conversations" else {"role": "assistant", "content": answer}
    if isinstance(answer, dict):
        return answer
    raise loc.err("bad_pair", which, f"'{which}' is {_type_name(answer)}, not an answer turn or a string",
                  f'write \'{which}\' as {{"from": "gpt", "value": "..."}} or as the answer\'s text')


def join_pair(chosen: dict, rejected: dict, loc: _Loc) -> dict:
    """Our preference sample from the two converted conversations, whose prompts must be the same."""
    c, r = chosen["messages"], rejected["messages"]
    if len(c) != len(r) or c[:-1] != r[:-1]:
        i = next((k for k in range(min(len(c), len(r)) - 1) if c[k] != r[k]), min(len(c), len(r)) - 1)
        raise loc.err("bad_pair", f"messages[{i}]", f"the chosen and the rejected conversations differ before their "
                      f"answers (turn {i}: {len(c)} and {len(r)} turns in all)",
                      "give both the same prompt (every turn but the last), differing only in the last answer")
    if c[-1].get("role") != "assistant" or r[-1].get("role") != "assistant":
        raise loc.err("bad_pair", f"messages[{len(c) - 1}]", "a conversation of the pair does not end with an "
                      "assistant answer", "end both with the answer: chosen, and rejected")
    last = {"role": "assistant", "chosen": c[-1]["content"], "rejected": r[-1]["content"]}
    out = {**chosen, "messages": c[:-1] + [last]}
    _validate(out, loc)
    return out


def convert_pair(convert: Callable[..., dict], obj: Any, loc: _Loc, **kw) -> dict | None:
    """A preference record of another tool through `convert` (its chat converter), as our
    preference sample; None when `obj` is not such a record."""
    split = split_pair(obj, loc)
    if split is None:
        return None
    return join_pair(convert(split[0], loc, **kw), convert(split[1], loc, **kw), loc)
