"""The lock file: the exact versions `make test` last passed with (requirements/lock.txt).

    python tools/lock.py write     # this environment's versions -> requirements/lock.txt
    python tools/lock.py check     # installed versions == the lock (exit 1 and list what differs)

`make install` installs with the lock as pip constraints; `make install-latest` installs the newest
versions pyproject.toml allows, and after `make test` passes on them `make lock` records them.

torch is not locked: a CUDA user's own torch build is kept (the Makefile installs the CPU wheel
only where no torch is present), and so are the packages only torch needs.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
# torch and what only torch pulls in: a user's CUDA build brings its own
NOT_LOCKED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|"
                        r"omni-finetune|pip|setuptools|wheel)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """name -> version of every distribution in this environment (canonical names)."""
    out = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out[canonical(name)] = d.version
    return out


def locked(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def write() -> int:
    import platform

    have = installed()
    pins = {n: v for n, v in sorted(have.items()) if not NOT_LOCKED.match(n)}
    torch = have.get("torch", "not installed")
    LOCK.parent.mkdir(exist_ok=True)
    header = [
        "# The versions `make test` last passed with; `make install` installs exactly these (as pip",
        "# constraints). Refresh deliberately: make install-latest && make test && make lock.",
        f"# Written on Python {platform.python_version()} with torch {torch} (torch itself is not locked).",
    ]
    LOCK.write_text("\n".join(header + [f"{n}=={v}" for n, v in pins.items()]) + "\n")
    print(f"wrote {LOCK} ({len(pins)} packages)")
    return 0


def check() -> int:
    """Every installed package at its locked version, and nothing installed that the lock lacks."""
    have, want = installed(), locked()
    bad = [f"  {n}: locked {want[n]}, installed {v}" for n, v in sorted(have.items()) if n in want and want[n] != v]
    bad += [f"  {n}: installed {v}, not in the lock (run `make lock` after `make test` passes)"
            for n, v in sorted(have.items()) if n not in want and not NOT_LOCKED.match(n)]
    if bad:
        print(f"the environment differs from {LOCK}:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    key = ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")
    print("installed the locked versions: " + ", ".join(f"{k} {want[k]}" for k in key if k in want)
          + f"; torch {have.get('torch', '?')} (not locked)")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd not in ("write", "check"):
        sys.exit(__doc__)
    sys.exit(write() if cmd == "write" else check())
