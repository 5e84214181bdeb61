"""What leaves the run folder to be shared holds no private data by default.

A real `python -m finetune run` (train, eval, export merged + adapter + 4-bit) on data whose sample
ids look like patient ids, with a system prompt of its own: no file of merged/, merged-4bit/ or
adapter_export/ holds an absolute path, the output folder, a sample id, a question, an answer or
the system prompt (every file's bytes are scanned); the run folder itself still keeps all of it.
`export.include_data_details: true` puts the details back into the export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow

SYSTEM = "You answer for the Zeta-4471 clinic only."
EXPORTS = ("merged", "merged-4bit", "adapter_export")
# an absolute POSIX path of two parts or more, or a Windows drive path, in a text file
ABS_PATH = re.compile(r"""(?:^|[\s"'`(=:,\[])(/(?:[\w.@+-]+/)+[\w.@+-]+|[A-Za-z]:\\\\?[\w.-]+)""")


def _private_data(tmp_path_factory) -> dict:
    """The small demo set, its sample ids rewritten to patient-like ids (MRN-<n>-<split>)."""
    from finetune.demo_data import generate_medical

    demo = generate_medical(tmp_path_factory.mktemp("private data"), n_train=24, n_eval=12, seed=0)
    ids, texts = [], []
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in demo[split].read_text().splitlines()]
        for i, row in enumerate(rows):
            row["id"] = f"MRN-{90417 + i:06d}-{split}"
            ids.append(row["id"])
            for m in row["messages"]:
                if m["role"] == "system":
                    continue
                c = m["content"]
                texts += [c] if isinstance(c, str) else [p["text"] for p in c if p.get("type") == "text"]
        demo[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**demo, "ids": ids, "texts": sorted({t for t in texts if len(t) >= 12})}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    data = _private_data(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("privacy run")
    over = tiny_overrides(tmp, data, "train.max_steps=2", "eval.max_samples=4", "eval.max_new_tokens=4",
                          "eval.bootstrap=50", "export.format=both", "export.quantize=4bit",
                          f"data.system_prompt={SYSTEM}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", "run", "medical-tiny", *over], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"run": tmp / "run", "data": data, "tmp": tmp}


def _forbidden(shared) -> dict[str, bytes]:
    """What no shared file may hold: the absolute folders this run touched, the output folder, the ids,
    the sample texts and the system prompt."""
    data_dir = Path(shared["data"]["train"]).parent
    cache = os.environ.get("OMNI_FINETUNE_CACHE", str(ROOT / ".cache"))
    out = {"data folder": str(data_dir), "output folder": str(shared["run"]), "test folder": str(shared["tmp"]),
           "repository": str(ROOT), "toolkit cache": str(Path(cache).resolve()), "home": str(Path.home()),
           "system prompt": SYSTEM}
    out.update({f"sample id {i}": i for i in shared["data"]["ids"]})
    out.update({f"sample text {t!r}": t for t in shared["data"]["texts"]})
    return {k: v.encode() for k, v in out.items()}


def _leaks(folder: Path, forbidden: dict[str, bytes]) -> list[str]:
    found = []
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    assert files, folder
    for p in files:
        raw = p.read_bytes()
        found += [f"{p.relative_to(folder.parent)}: {what}" for what, needle in forbidden.items() if needle in raw]
        if p.suffix != ".safetensors":
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            found += [f"{p.relative_to(folder.parent)}: absolute path {m.group(1)!r}" for m in ABS_PATH.finditer(text)]
    return found


def test_shared_exports_hold_no_paths_ids_or_sample_text(shared):
    run = shared["run"]
    forbidden = _forbidden(shared)
    leaks = [x for name in EXPORTS for x in _leaks(run / name, forbidden)]
    assert leaks == [], "\n".join(leaks[:40])


def test_the_run_folder_keeps_the_full_record(shared):
    run, data = shared["run"], shared["data"]
    recipe = (run / "recipe.yaml").read_text()
    assert str(data["train"]) in recipe and str(run) in recipe and SYSTEM in recipe
    preds = (run / "predictions.jsonl").read_text()
    assert sum(i in preds for i in data["ids"]) == 4
    page = (run / "eval.html").read_text()
    assert "data:image/" in page and any(t in page for t in data["texts"])


def test_the_card_names_data_by_file_name_with_counts(shared):
    run = shared["run"]
    card = (run / "merged" / "README.md").read_text()
    assert "`train.jsonl` (24 samples)" in card and "`eval.jsonl` (12 samples)" in card
    assert "system prompt" in card and SYSTEM not in card
    assert "tiny:qwen2_5_omni" in card
    shared_recipe = yaml.safe_load((run / "merged" / "recipe.yaml").read_text())["recipe"]
    assert shared_recipe["data"]["train"] == "train.jsonl" and shared_recipe["data"]["eval"] == "eval.jsonl"
    assert "dir" not in shared_recipe.get("output", {}) and "system_prompt" not in shared_recipe["data"]
    manifest = json.loads((run / "merged" / "export_manifest.json").read_text())
    assert all(set(p) == {"modalities"} for p in manifest["verify"]["probes"]), manifest["verify"]["probes"]
    assert json.loads((run / "adapter_export" / "base_model.json").read_text()) == {"base_model": "tiny:qwen2_5_omni"}
    assert "tiny:qwen2_5_omni" in (run / "adapter_export" / "README.md").read_text()


def test_include_data_details_puts_them_back(shared, tmp_path):
    """The opt-in: the card and recipe carry the data paths and the system prompt, the probes their ids."""
    from finetune.export import export_run
    from finetune.recipe import load_resolved, save_resolved

    run = tmp_path / "run"
    shutil.copytree(shared["run"], run, ignore=shutil.ignore_patterns("merged*", "adapter_export", "checkpoints"))
    recipe = load_resolved(run / "recipe.yaml")
    recipe.export.include_data_details = True
    recipe.export.quantize = "none"
    save_resolved(recipe, run / "recipe.yaml")
    export_run(run, fmt="both")
    train = str(shared["data"]["train"])
    assert train in (run / "merged" / "README.md").read_text() and SYSTEM in (run / "merged" / "README.md").read_text()
    assert train in (run / "merged" / "recipe.yaml").read_text()
    probes = json.loads((run / "merged" / "export_manifest.json").read_text())["verify"]["probes"]
    assert all(p["id"] in shared["data"]["ids"] and p["where"] for p in probes)
