"""`python -m finetune chat TARGET`: talk to a tuned model in the terminal (layer 6).

TARGET is a run folder, an export folder (merged/) or a recipe (finetune.inference.open_model).
Each line typed is a question; the answer streams as it is generated, and the conversation is
kept (multi-turn) until /reset. Attach media to the next question with `/image PATH`,
`/audio PATH` or `/video PATH` (checked at once, as a dataset's media are); `/base` and `/tuned`
switch the adapter off and on (one model in memory); `/quit` or end of input ends it.

`--prompt TEXT` (with --image/--audio/--video, in the order given) answers once and prints the
answer alone: for scripts; `--base` answers with the adapter off. The answer is `eval`'s greedy
answer for the same sample (finetune.probes.generate).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from finetune.data.schema import MEDIA_TYPES
from finetune.errors import UserError
from finetune.inference import Assistant, Turn, describe

HELP = ("type a question and press Enter; /image PATH, /audio PATH, /video PATH attach a file to the next "
        "question; /base and /tuned switch the adapter off and on; /reset forgets the conversation; /quit ends")


def answer_once(assistant: Assistant, prompt: str, attachments, *, tuned: bool = True) -> str:
    """The answer to one question with its attachments ((kind, path) pairs, in order)."""
    return assistant.ask([], prompt, attachments, tuned=tuned).answer


def interactive(assistant: Assistant, *, tuned: bool = True, attachments=(), stdin: TextIO = sys.stdin,
                stdout: TextIO = sys.stdout) -> int:
    """The terminal chat loop (returns the exit status). A problem with a question or a file is
    printed as one line and the conversation goes on without that question."""
    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say(f"chat: {describe(assistant)}")
    for note in assistant.notes:
        say(f"note: {note}")
    say(HELP)
    history: list[Turn] = []
    pending: list[tuple[str, Path]] = list(attachments)
    tuned = tuned and assistant.has_adapter
    while True:
        say(f"{assistant.name(tuned)}> ", end="")
        line = stdin.readline()
        if not line:
            say()
            return 0
        line = line.strip()
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/help":
            say(HELP)
            continue
        if cmd in ("/base", "/tuned"):
            if not assistant.has_adapter:
                say(f"{assistant.label} is the tuned model merged, with no adapter to switch off: chat with its run "
                    "folder for /base" if assistant.own == "merged" else
                    f"{assistant.label} has no adapter: every answer is the model's own")
                continue
            tuned = cmd == "/tuned"
            say(f"adapter {'on' if tuned else 'off'}: answers from the {'tuned' if tuned else 'base'} model")
            continue
        if cmd == "/reset":
            history, pending = [], []
            say("conversation forgotten")
            continue
        if cmd.startswith("/") and cmd[1:] in MEDIA_TYPES:
            path = Path(rest.strip()).expanduser()
            try:
                assistant.sample([], "", [(cmd[1:], path)])  # checked now: decoded as a dataset's media are
            except UserError as e:
                say(f"error: {e}")
                continue
            pending.append((cmd[1:], path))
            say(f"attached {cmd[1:]} {path} to the next question")
            continue
        if cmd.startswith("/"):
            say(f"unknown command {cmd}; {HELP}")
            continue
        say(f"{assistant.name(tuned)}: ", end="")
        try:
            turn = assistant.ask(history, line, pending, tuned=tuned, on_text=lambda t: say(t, end=""))
        except UserError as e:
            say()
            say(f"error: {e}")
            continue
        say()
        pending = []
        if turn.answer:
            history.append(turn)
