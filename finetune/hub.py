"""Models and datasets named by their hub id (`org/name`), resolved through huggingface_hub's cache.

A hub id resolves to a snapshot folder of the standard HF cache (HF_HUB_CACHE, else HF_HOME/hub,
else ~/.cache/huggingface/hub), downloaded when it is missing and the Hub can be reached. With
HF_HUB_OFFLINE=1, or when the Hub cannot be reached, the cache alone answers; an entry that is not
there is a MissingFileError that gives the exact `hf download` command to run.

Nothing here is called for a local folder or a `tiny:` model. Every resolution (id, requested
revision, commit, folder) is remembered for the run folder (`write_resolved`), so a run records
exactly which snapshot it trained on.

The environment is read at each call, not at import (huggingface_hub reads its constants once), so
that a process that sets HF_HUB_OFFLINE or HF_HUB_CACHE before resolving gets what it asked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from finetune import fsutil
from finetune.errors import ConfigError, MissingFileError

#: `org/name`: both parts ASCII letters, digits, '-', '_' or '.', neither starting or ending with
#: '-' or '.', no '--' or '..' (huggingface_hub's rules), at most 96 characters each
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")

_TRUE = {"1", "ON", "YES", "TRUE"}

# (repo_type, repo_id, revision, cache folder, offline) -> snapshot folder: a run asks several times
# (family detection, loading, export); online, each would be a Hub request
_MEMO: dict[tuple, Path] = {}
# what this process resolved since the last clear_resolved(), in order, one entry per snapshot
_RESOLVED: list[dict] = []


def is_hub_id(text: str) -> bool:
    """True when `text` has the shape of a hub id `org/name` (and not of a path: no leading '.',
    '/', '~', no third part)."""
    text = str(text)
    return bool(_HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def cache_dir() -> Path:
    """The HF hub cache folder this process uses (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    else huggingface_hub's default)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: resolve from the cache only."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var in os.environ:
            return os.environ[var].strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, revision: str = "", repo_type: str = "model") -> str:
    """The `hf download` command (huggingface_hub's CLI) that puts this snapshot into the cache."""
    cmd = f"hf download {repo_id} --revision {revision or 'main'}"
    if repo_type != "model":
        cmd += f" --repo-type {repo_type}"
    return cmd


def resolve_model(path_or_id: str, revision: str = "", *, hint: str = "") -> Path:
    """The folder of `model.path`: an existing local folder as it is (nothing is looked up), else a
    hub id's snapshot folder in the HF cache. A string that is neither is a MissingFileError saying
    it is not a folder (with `hint`, what the family's folder should hold)."""
    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        return folder
    if not is_hub_id(path_or_id):
        raise MissingFileError(f"model.path {path_or_id!r} is not a folder. {hint}".rstrip())
    return _snapshot(path_or_id, "model", revision, what="model.path")


def resolve_dataset(repo_id: str, revision: str = "") -> Path:
    """The snapshot folder of a dataset repo `org/name` in the HF cache (downloaded when missing
    and the Hub can be reached)."""
    if not is_hub_id(repo_id):
        raise ConfigError(f"data source hub {repo_id!r} is not a hub id; write it as org/name "
                          "(or use path: for a local file or folder)")
    return _snapshot(repo_id, "dataset", revision, what="data source hub")


def _snapshot(repo_id: str, repo_type: str, revision: str, *, what: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    cache, off = cache_dir(), offline()
    key = (repo_type, repo_id, revision or "main", str(cache), off)
    folder = _MEMO.get(key)
    if folder is None or not folder.is_dir():
        cmd = download_command(repo_id, revision, repo_type)
        env = " (in a shell with this run's HF_HUB_CACHE / HF_HOME)" if any(
            os.environ.get(v) for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")) else ""
        label = f"{what} {repo_id!r} (revision {revision or 'main'})"
        try:
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, repo_type=repo_type, revision=revision or None, cache_dir=str(cache),
                local_files_only=off, endpoint=os.environ.get("HF_ENDPOINT") or None))
        except hf_errors.IncompleteSnapshotError as e:
            raise MissingFileError(f"{label}: the cached snapshot in {cache} is incomplete ({e}); "
                                   f"complete it: {cmd}{env}") from None
        except hf_errors.LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE is set" if off else "the Hub cannot be reached"
            local = "" if repo_type != "model" else \
                f"; if a local folder was meant: there is none at {Path(repo_id).expanduser().resolve()}"
            raise MissingFileError(f"{label} is not in the HF cache {cache} and {why}; download it first: "
                                   f"{cmd}{env}{local}") from None
        except hf_errors.GatedRepoError:
            raise ConfigError(f"{label} is gated: accept its terms on the Hub, log in (hf auth login), "
                              f"then run: {cmd}") from None
        except hf_errors.RevisionNotFoundError:
            raise ConfigError(f"{label}: the Hub has no revision {revision!r} in {repo_id}; use a branch, tag "
                              "or commit of the repo") from None
        except hf_errors.RepositoryNotFoundError:
            kind = "dataset" if repo_type == "dataset" else "model"
            raise ConfigError(f"{label}: no {kind} repo {repo_id!r} on the Hub (or it is private: log in with "
                              "hf auth login); check the id, or point it at a local folder") from None
        except hf_errors.HfHubHTTPError as e:
            raise ConfigError(f"{label}: the Hub answered {e}; retry, or download it with: {cmd}") from None
        _MEMO[key] = folder
    _record(repo_type, repo_id, revision, folder, cache, off)
    return folder


def _record(repo_type: str, repo_id: str, revision: str, folder: Path, cache: Path, off: bool) -> None:
    entry = {"kind": repo_type, "id": repo_id, "revision": revision or "main",
             # the cache keeps each commit's files in snapshots/<commit hash>/
             "commit": folder.name, "folder": str(folder), "cache": str(cache), "offline": off}
    same = ("kind", "id", "revision", "folder")
    if not any(all(e[k] == entry[k] for k in same) for e in _RESOLVED):
        _RESOLVED.append(entry)
        print(f"{'dataset' if repo_type == 'dataset' else 'model'} {repo_id} (revision {entry['revision']}): "
              f"commit {entry['commit']} from {folder}", flush=True)


def resolved() -> list[dict]:
    """Every hub id resolved since the last `clear_resolved()` (kind, id, revision, commit, folder)."""
    return [dict(e) for e in _RESOLVED]


def clear_resolved() -> None:
    """Forget the recorded resolutions (a new run in the same process starts with none)."""
    _RESOLVED.clear()


def write_resolved(run_dir: Path) -> Path | None:
    """run_dir/resolved_sources.json: the hub snapshots this run resolved, so it can be reproduced
    (`model.revision` / the source's `revision` set to the recorded commit). Nothing is written, and
    an old file is removed, when the run used local paths only."""
    path = Path(run_dir) / "resolved_sources.json"
    if not _RESOLVED:
        path.unlink(missing_ok=True)
        return None
    return fsutil.atomic_write_json(path, resolved(), indent=2)
