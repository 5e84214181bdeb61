"""Export a run: merge the adapter into the base, write a complete checkpoint, verify it.

Everything comes from the run folder (its resolved recipe and adapter), so
`python -m finetune export RUN_DIR` needs nothing else. The base is reloaded unquantised
(QLoRA runs too) in float32, the adapter applied and merged there, and the result cast to
`export.dtype`. The checkpoint is written into a temporary folder beside the target, reloaded
from disk and compared with the adapter model on probe samples; only a verified export is
renamed into place, so an interrupted or failing export never leaves a partial target and
never damages the previous one. No timestamps are written: exporting twice is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from finetune.recipe import ROLE_NAMES


class ExportError(RuntimeError):
    """The export did not verify or could not be written."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_dtype(setting: str, base_path: Path) -> torch.dtype:
    """auto -> the dtype the base checkpoint was saved in (bfloat16 when it does not say)."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]
    cfg = json.loads((base_path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("thinker_config") or {}).get("torch_dtype")
    return {"float32": torch.float32, "float16": torch.float16}.get(str(name), torch.bfloat16)


def pick_probes(samples: list, max_probes: int = 4) -> list:
    """One sample per modality mix present in the data (text, image, audio, video, mixes)."""
    seen: dict[str, object] = {}
    for s in samples:
        key = "+".join(sorted(s.modalities()))
        if key not in seen:
            seen[key] = s
        if len(seen) >= max_probes:
            break
    return list(seen.values())


@torch.no_grad()
def probe_logits(model, family, processor, probes, rope) -> list[torch.Tensor]:
    """Logits of each probe sample alone, in float32."""
    model.eval()
    out = []
    for s in probes:
        enc = family.encode(s, processor, rope=rope)
        batch = family.collate_padded([enc], processor.pad_id)
        batch.pop("labels")
        out.append(model(**batch).logits[0].float())
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def tolerance(dtype: torch.dtype, atol: float, ref: list[torch.Tensor]) -> float:
    """float32: the recipe's atol. 16-bit: rounding of the weights dominates, so scale by logits."""
    if dtype == torch.float32:
        return atol
    scale = max(float(x.abs().max()) for x in ref)
    return max(atol, 0.05 * scale)


def write_model_card(out: Path, recipe, run_dir: Path, base_path: Path, manifest: dict) -> None:
    """README.md: base, recipe, data, eval figures, verification."""
    ev = {}
    if (run_dir / "eval.json").exists():
        ev = json.loads((run_dir / "eval.json").read_text())
    lines = [
        f"# {recipe.name}: fine-tuned {manifest['family']}", "",
        "Exported by omni-finetune (LoRA merged into the base weights).", "",
        f"- base model: `{base_path.name}` ({recipe.model.path})",
        f"- recipe: `{recipe.name}` (resolved recipe in `recipe.yaml`)",
        f"- training data: `{recipe.data.train}`; eval data: `{recipe.data.eval or '-'}`",
        "- roles: " + ", ".join(f"{r}={getattr(recipe.roles, r).mode}" for r in manifest["roles"]),
        f"- dtype: {manifest['dtype']}",
        f"- verification: max |logit difference| vs the adapter model {manifest['verify']['max_abs_diff']:.2e} "
        f"(tolerance {manifest['verify']['tolerance']:.1e}): {'PASS' if manifest['verify']['passed'] else 'FAIL'}",
    ]
    if ev:
        lines += ["", "## Evaluation (held-out)", "", "| metric | base | tuned |", "|---|---|---|"]
        for k in ("accuracy", "lesion_accuracy", "token_loss"):
            if k in ev.get("tuned", {}):
                b = ev.get("base", {}).get(k)
                lines.append(f"| {k} | {'-' if b is None else f'{b:.3f}'} | {ev['tuned'][k]:.3f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def export_run(run_dir: Path, *, force: bool = False, fmt: str | None = None) -> dict[str, Path]:
    """Export a trained run folder; returns the written folders ({'merged': ..., 'adapter': ...})."""
    from peft import PeftModel

    from finetune.families import family_for
    from finetune.recipe import load_resolved, save_resolved
    from finetune.train import quiet_libraries, read_split

    quiet_libraries()
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise ExportError(f"{run_dir}: not a run folder (no recipe.yaml); train first")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(f"{adapter}: no adapter; training has not finished")
    recipe = load_resolved(run_dir / "recipe.yaml")
    fmt = fmt or recipe.export.format
    written: dict[str, Path] = {}

    if fmt in ("adapter", "both"):
        target = run_dir / "adapter_export"
        written["adapter"] = _atomic_copy_tree(adapter, target, force=force)
    if fmt not in ("merged", "both"):
        return written

    family = family_for(recipe.model.path, recipe.model.family)
    target = run_dir / "merged"
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it (the old one is kept until the new "
                          "one is verified)")
    loaded = family.load(recipe, quantize="none", dtype=torch.float32, attn="sdpa")
    dtype = export_dtype(recipe.export.dtype, loaded.base_path)
    rope = family.rope_index(loaded.model)
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    samples, _ = read_split(recipe.data.eval or recipe.data.train, recipe)
    probes = pick_probes(samples)
    ref = probe_logits(model, family, loaded.processor, probes, rope)
    merged = model.merge_and_unload()

    tmp = Path(tempfile.mkdtemp(prefix="merged.tmp-", dir=run_dir))
    try:
        family.save_merged(merged, loaded, tmp, dtype=dtype, max_shard_size=recipe.export.max_shard_size)
        save_resolved(recipe, tmp / "recipe.yaml")
        del merged
        reloaded = family.load_merged_for_check(tmp, torch.float32)
        got = probe_logits(reloaded, family, loaded.processor, probes, rope)
        diff = max_diff(ref, got)
        tol = tolerance(dtype, recipe.export.verify_atol, ref)
        manifest = {
            "family": family.name,
            "base": str(recipe.model.path),
            "recipe": recipe.name,
            "dtype": str(dtype).replace("torch.", ""),
            "roles": [r for r in ROLE_NAMES if getattr(recipe.roles, r).mode != "frozen"],
            "verify": {"max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol,
                       "probes": [{"id": s.id, "where": s.where, "modalities": sorted(s.modalities())}
                                  for s in probes],
                       "compared": "logits of the reloaded export vs the base+adapter model, float32"},
        }
        write_model_card(tmp, recipe, run_dir, loaded.base_path, manifest)
        manifest["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "export_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if not manifest["verify"]["passed"]:
            raise ExportError(f"export verification FAILED: max |logit diff| {diff:.3e} > tolerance {tol:.1e}; "
                              f"nothing was written to {target}")
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written["merged"] = target
    return written


def _replace(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`; an existing target is swapped out only after the move is ready."""
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def _atomic_copy_tree(src: Path, target: Path, *, force: bool) -> Path:
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _replace(tmp, target)
    return target
