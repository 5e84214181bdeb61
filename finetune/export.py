"""Export a run: merge the adapter into the base, write a complete checkpoint, verify it.

Everything comes from the run folder (its resolved recipe and adapter), so
`python -m finetune export RUN_DIR` needs nothing else. The base is reloaded unquantised
(QLoRA runs too) in float32, the adapter applied and merged there, and the result cast to
`export.dtype`. The checkpoint is written into a temporary folder beside the target, reloaded
from disk and compared with the adapter model on probe samples; only a verified export is
renamed into place (fsutil.staged_dir), so an interrupted or failing export never leaves a
partial target and never damages the previous one. No timestamps are written: exporting twice
is byte-identical. An export folder is replaced (with --force, or by `run`) only when the toolkit
wrote everything in it: a file put there by hand stops the export, naming it, before any work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from finetune import fsutil
from finetune.checkpoint import raw_equal, tensors_of
from finetune.data.prepare import prepare, record_path
from finetune.data.reading import read_split
from finetune.errors import UserError
from finetune.families.base import ROLE_NAMES
from finetune.models import family_of, load_spec, model_folder, processor_of
from finetune.paths import cache_root
from finetune.probes import pick_probes, probe_logits
from finetune.recipe import load_resolved, save_resolved
from finetune.recipe.run import file_name, model_name, save_shareable
from finetune.runfolder import lock_run
from finetune.runtime import is_main_process, quiet_libraries, torch_dtype


class ExportError(UserError, RuntimeError):
    """The export did not verify or could not be written."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_dtype(setting: str, base_path: Path, family) -> torch.dtype:
    """auto -> the dtype the base checkpoint was saved in (bfloat16 when it does not say)."""
    if setting != "auto":
        return torch_dtype(setting)
    name = str(family.saved_dtype(base_path))
    return torch_dtype(name) if name in ("float32", "float16") else torch.bfloat16


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def tolerance(dtype: torch.dtype, atol: float, ref: list[torch.Tensor]) -> float:
    """float32: the recipe's atol. 16-bit: rounding of the weights dominates, so scale by logits."""
    if dtype == torch.float32:
        return atol
    scale = max(float(x.abs().max()) for x in ref)
    return max(atol, 0.05 * scale)


def _eval_lines(run_dir: Path) -> list[str]:
    if not (run_dir / "eval.json").exists():
        return ["", "No evaluation was run before this export."]
    ev = json.loads((run_dir / "eval.json").read_text())
    n = ev.get("n_samples")
    lines = ["", "## Evaluation (held-out)" + (f", {n} samples" if isinstance(n, int) else ""), "",
             "| metric | base | tuned |", "|---|---|---|"]
    tuned = ev.get("tuned", {})
    for k in ("accuracy", *(k for k in tuned if k.endswith("_accuracy") and k != "accuracy"), "token_loss"):
        if k in ev.get("tuned", {}):
            b = ev.get("base", {}).get(k)
            lines.append(f"| {k} | {'-' if b is None else f'{b:.3f}'} | {ev['tuned'][k]:.3f} |")
    return lines


def count_samples(path: str) -> int | None:
    """Samples in a local JSONL file (its non-blank lines, read in blocks: bounded memory for any
    line length); None for anything else or a file that cannot be read from here."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return None
    n, content = 0, False
    try:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                pieces = block.split(b"\n")
                for i, piece in enumerate(pieces):
                    content = content or bool(piece.strip())
                    if i < len(pieces) - 1:  # a line ends here
                        n, content = n + content, False
    except OSError:
        return None
    return n + content


def _data_label(path: str, details: bool, hub: str = "", split: str = "") -> str:
    """`train.jsonl` (24 samples): by file name (the path as given with include_data_details)."""
    if hub:
        return f"`{hub}`" + (f" (split {split})" if split else "")
    n = count_samples(path)
    return f"`{path if details else file_name(path)}`" + (f" ({n} samples)" if n is not None else "")


def data_lines(recipe) -> list[str]:
    """The model card's data lines: every training source and the eval set by name with counts."""
    details = recipe.export.include_data_details
    train = " + ".join(_data_label(s.path, details, s.hub, s.split) for s in recipe.data.sources()) or "-"
    lines = [f"- training data: {train}; eval data: "
             f"{_data_label(recipe.data.eval, details) if recipe.data.eval else '-'}"]
    if recipe.eval.general:
        lines.append(f"- general set (forgetting check): {_data_label(recipe.eval.general, details)}")
    return lines


def _usage(recipe, family, full: bool) -> list[str]:
    lines = ["", "## Use it", ""] + family.usage(full) + [
        "", "Images are resized with the training settings written into `preprocessor_config.json`."]
    if recipe.data.system_prompt and recipe.export.include_data_details:
        lines += ["", f"Training used this system prompt on samples without one: `{recipe.data.system_prompt}`."]
    elif recipe.data.system_prompt:
        lines += ["", "Training used a system prompt of its own on samples without one; its text is not written "
                      "into this export (the run folder's `recipe.yaml` has it; `export.include_data_details: true` "
                      "copies it here). Give the model the same system prompt at inference."]
    lines += ["", "## Serve it", "",
              "With omni-finetune: `python -m finetune chat path/to/merged` answers in the terminal (`--prompt TEXT "
              "--image FILE` once, for scripts), and `python -m finetune serve path/to/merged` opens a local page "
              "(127.0.0.1) that answers an uploaded image, audio clip or video."]
    serving = family.serving(full)
    if serving:
        lines += [""] + serving
    return lines


def write_model_card(out: Path, recipe, family, run_dir: Path, base_path: Path, manifest: dict,
                     full_layout: bool) -> None:
    """README.md: base, recipe, data (by file name with counts), eval figures, verification, how to load it.

    Without `export.include_data_details` it names no absolute path, sample or system prompt text."""
    kept = manifest["unchanged_from_base"]
    details = recipe.export.include_data_details
    staged = manifest.get("stages")
    base = (f"`{staged['original_base']}`, trained in stages {', '.join(staged['stages'])} (each merged before "
            "the next)") if staged else f"`{manifest['base']}`"
    lines = [
        f"# {recipe.name}: fine-tuned {manifest['family']}", "",
        "Exported by omni-finetune: LoRA adapters merged into the base weights, `full` roles written back.", "",
        f"- base model: {base}; layout: {manifest['layout']}",
        f"- recipe: `{recipe.name}` (" + ("the resolved recipe is `recipe.yaml`)" if details else
                                          "`recipe.yaml`: the resolved recipe, data files by name)"),
        *data_lines(recipe),
        "- trained roles: " + ", ".join(f"{r}={getattr(recipe.roles, r).mode}" for r in manifest["roles"]),
        f"- dtype: {manifest['dtype']}",
        f"- verification: max |logit difference| vs the adapter model {manifest['verify']['max_abs_diff']:.2e} "
        f"(tolerance {manifest['verify']['tolerance']:.1e}): {'PASS' if manifest['verify']['passed'] else 'FAIL'}",
    ]
    if kept["tensors"]:
        lines.append(f"- copied unchanged from the base: {', '.join(kept['parts'])} ({kept['tensors']} tensors, "
                     f"bit-identical: {'yes' if kept['bit_identical'] else 'NO'})")
    lines += _eval_lines(run_dir) + _usage(recipe, family, full_layout)
    (out / "README.md").write_text("\n".join(lines) + "\n")


def adapter_card(recipe, family, base: Path) -> str:
    """adapter_export/README.md: what the adapter is for and how to load it (the base by its
    folder name or hub id, never its absolute path unless export.include_data_details)."""
    named = str(recipe.model.path) if recipe.export.include_data_details else model_name(recipe.model.path)
    return "\n".join([
        f"# {recipe.name}: LoRA adapter for {family.name}", "",
        f"A PEFT adapter trained by omni-finetune on `{named}`, recipe `{recipe.name}`.",
        "The processor files beside it carry the training image settings.", ""] + family.usage(False) + [""])


def export_run(run_dir: Path, *, force: bool = False, fmt: str | None = None, recipe=None) -> dict[str, Path]:
    """Export a trained run folder; returns the written folders ({'merged': ..., 'adapter': ...}).
    `recipe`: the settings to export with (the run's recipe.yaml with the command's overrides,
    finetune.recipe.run.load_run; a staged run's last stage); default the run's recipe.yaml as it is.

    Under torchrun (`run` launched on several processes) only rank 0 exports; the others
    return at once with nothing written."""

    if not is_main_process():
        return {}
    quiet_libraries()
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise ExportError(f"{run_dir}: not a run folder (no recipe.yaml); train first")

    lock_run(run_dir)  # refuses a folder that is not a run folder of ours; recovers a cut adapter swap
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(f"{adapter}: no adapter; training has not finished")
    recipe = recipe if recipe is not None else load_resolved(run_dir / "recipe.yaml")
    fmt = fmt or recipe.export.format
    written: dict[str, Path] = {}
    for name in EXPORT_NAMES:
        recover(run_dir / name)
    check_targets(run_dir, recipe, fmt)

    if fmt in ("adapter", "both"):
        written["adapter"] = export_adapter(run_dir, recipe, force=force)
    if fmt in ("merged", "both"):
        written["merged"] = export_merged(run_dir, recipe, force=force)
        if recipe.export.quantize != "none":
            written[f"merged-{recipe.export.quantize}"] = export_quantized(run_dir, recipe, force=force)
    return written


def probe_samples(recipe, family, processor, config: dict, rope) -> list:
    """The samples the export is verified on (data.eval, else data.train), read and checked as
    training checked them (remembered by content: instant after training). Under data.on_error
    skip a sample the model cannot take (a video for a family without video, say) is left out
    and counted; under raise the first stops the export, naming its line."""

    split = recipe.data.eval or recipe.data.train
    samples, skipped = read_split(split, recipe, on_error="skip")
    good, _, bad = prepare(samples, family, processor, config, rope, max_tokens=recipe.data.max_tokens,
                           record=record_path(samples, cache_root()) if samples else None)
    skipped += bad
    if skipped and recipe.data.on_error == "raise":
        raise min(skipped, key=lambda e: (str(e.file), e.line or 0))
    if skipped:
        print(f"export: {len(skipped)} sample(s) of the probe data left out (data.on_error: skip)", flush=True)
    if not good:
        raise ExportError(f"{split}: no usable sample to verify the export on")
    return good


EXPORT_NAMES = ("merged", "adapter_export", "merged-4bit", "merged-8bit")
#: test hook: FINETUNE_EXPORT_KILL=merged_written | verified | adapter_written | swapping kills the export there
EXPORT_KILL = "FINETUNE_EXPORT_KILL"


def legacy_export(folder: Path) -> bool:
    """An export folder written before the ownership record existed: our manifest, or our adapter card."""
    if (folder / "export_manifest.json").is_file():
        return True
    try:
        return (folder / "adapter_config.json").is_file() and "trained by omni-finetune" in (folder / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return False


def check_targets(run_dir: Path, recipe, fmt: str | None = None) -> None:
    """Refuse now (fsutil.NotOursError, naming the files) an existing export folder this export
    would replace that holds files the toolkit did not write; `run` calls it before training."""
    fmt = fmt or recipe.export.format
    names = (["adapter_export"] if fmt in ("adapter", "both") else []) + (
        ["merged"] + ([f"merged-{recipe.export.quantize}"] if recipe.export.quantize != "none" else [])
        if fmt in ("merged", "both") else [])
    for name in names:
        fsutil.check_replaceable(Path(run_dir) / name, legacy_export)


def recover(target: Path) -> None:
    """Undo what an export killed midway left: our stale temporary folders, a half-done swap
    (fsutil.recover_dir); what the toolkit did not make is left alone."""
    fsutil.recover_dir(target, legacy_export)


def _kill_point(where: str) -> None:
    """Test hook: FINETUNE_EXPORT_KILL=<where> kills this process there (SIGKILL, no cleanup)."""
    fsutil.kill_point(EXPORT_KILL, where)


def export_adapter(run_dir: Path, recipe, *, force: bool) -> Path:
    """The PEFT adapter with the processor files beside it and a README on how to load it."""

    family = family_of(recipe)
    base = model_folder(recipe, family)
    target = run_dir / "adapter_export"
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it")
    fsutil.check_replaceable(target, legacy_export)
    with _staged(target) as tmp:
        for p in sorted((run_dir / "adapter").iterdir()):
            if p.is_file():
                shutil.copyfile(p, tmp / p.name)
        family.copy_processor_files(base, tmp)
        proc = processor_of(recipe, family, base)
        family.write_processor_settings(tmp, proc)
        if not recipe.export.include_data_details:
            _name_base_only(tmp, recipe)
        (tmp / "README.md").write_text(adapter_card(recipe, family, base))
        _kill_point("adapter_written")
    return target


def _name_base_only(folder: Path, recipe) -> None:
    """The adapter's own records of its base (PEFT's adapter_config.json, our base_model.json) name
    it by hub id or folder name: the run folder's copies keep the absolute path."""
    name = model_name(recipe.model.path)
    cfg = folder / "adapter_config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text())
        if data.get("base_model_name_or_path"):
            data["base_model_name_or_path"] = name
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True))
    if (folder / "base_model.json").exists():
        (folder / "base_model.json").write_text(json.dumps({"base_model": name}, indent=2))


def export_merged(run_dir: Path, recipe, *, force: bool) -> Path:
    """Merge, write in the base's layout, reload from disk, compare, then rename into place."""
    from peft import PeftModel


    family = family_of(recipe)
    target = run_dir / "merged"
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it (the old one is kept until the new "
                          "one is verified)")
    fsutil.check_replaceable(target, legacy_export)  # before the model is loaded
    base_path = model_folder(recipe, family)
    dtype = export_dtype(recipe.export.dtype, base_path, family)
    # QLoRA runs too: the base is reloaded unquantised, in the export dtype, and merged there
    loaded = family.load(load_spec(recipe, quantize="none", dtype=dtype, attn="sdpa"))
    rope = family.rope_index(loaded.model)
    model = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter"))
    probes = pick_probes(probe_samples(recipe, family, loaded.processor, family.read_config(loaded.base_path), rope))
    ref = probe_logits(model, family, loaded.processor, probes, rope)
    merged = model.merge_and_unload()

    with _staged(target) as tmp:
        written = family.save_merged(merged, loaded, tmp, dtype=dtype, max_shard_size=recipe.export.max_shard_size)
        details = recipe.export.include_data_details
        (save_resolved if details else save_shareable)(recipe, tmp / "recipe.yaml")
        del merged, model
        _kill_point("merged_written")
        reloaded = family.load_merged_for_check(tmp, dtype)
        got = probe_logits(reloaded, family, loaded.processor, probes, rope)
        del reloaded
        diff = max_diff(ref, got)
        tol = tolerance(dtype, recipe.export.verify_atol, ref)
        kept = written.kept_tensors
        if kept:
            base_t, out_t = tensors_of(base_path), tensors_of(tmp)
            same = all(raw_equal(base_t[k], out_t[k]) for k in kept)
        else:
            same = True
        parts = _part_names(kept, tensors_of(tmp).keys())
        manifest = {
            "family": family.name,
            "layout": written.layout,
            "base": str(recipe.model.path) if details else model_name(recipe.model.path),
            "recipe": recipe.name,
            "dtype": str(dtype).replace("torch.", ""),
            "roles": [r for r in ROLE_NAMES if getattr(recipe.roles, r).mode != "frozen"],
            "unchanged_from_base": {"parts": parts, "tensors": len(kept), "bit_identical": same},
            "verify": {"max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol and same,
                       "probes": [({"id": s.id, "where": s.where} if details else {})
                                  | {"modalities": sorted(s.modalities())} for s in probes],
                       "compared": f"logits of the export reloaded from disk vs the base+adapter model, "
                                   f"{str(dtype).replace('torch.', '')}"},
        }
        staged = _stages_of(run_dir)
        if staged and not details:
            staged["original_base"] = model_name(staged["original_base"])
        if staged:
            manifest["stages"] = staged
        write_model_card(tmp, recipe, family, run_dir, base_path, manifest, loaded.is_full_checkpoint)
        manifest["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        fsutil.atomic_write_json(tmp / "export_manifest.json", manifest, indent=2, sort_keys=True)
        if not same:
            raise ExportError(f"export verification FAILED: parts copied from the base ({', '.join(parts)}) are not "
                              f"bit-identical; nothing was written to {target}")
        if not manifest["verify"]["passed"]:
            raise ExportError(f"export verification FAILED: max |logit diff| {diff:.3e} > tolerance {tol:.1e}; "
                              f"nothing was written to {target}")
        _kill_point("verified")
    return target


def _stages_of(run_dir: Path) -> dict | None:
    """A staged run (stages.yaml beside recipe.yaml): the original base and the stages in order;
    the merged model is the last stage's adapter on the stage before's merged export."""

    path = Path(run_dir) / "stages.yaml"
    if not path.exists():
        return None
    staged = load_resolved(path)
    return {"original_base": staged.model.path, "stages": [name for name, _, _ in staged.stages]}


def export_quantized(run_dir: Path, recipe, *, force: bool) -> Path:
    """merged-<4bit|8bit>/: the verified merged export quantised, reloaded and compared."""

    family = family_of(recipe)
    q = recipe.export.quantize
    merged = run_dir / "merged"
    target = run_dir / f"merged-{q}"
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it")
    fsutil.check_replaceable(target, legacy_export)
    dtype = export_dtype(recipe.export.dtype, merged, family)
    compute = torch.bfloat16 if dtype == torch.float32 and torch.cuda.is_available() else dtype
    with _staged(target) as tmp:
        fmt = family.save_quantized(merged, tmp, quantize=q, dtype=compute)
        processor = processor_of(recipe, family)
        reference = family.load_merged_for_check(merged, torch.float32)
        rope = family.rope_index(reference)
        base = model_folder(recipe, family)
        probes = pick_probes(probe_samples(recipe, family, processor, family.read_config(base), rope))
        ref = probe_logits(reference, family, processor, probes, rope)
        del reference
        got = probe_logits(family.load_quantized_for_check(tmp), family, processor, probes, rope)
        scale = max(float(x.abs().max()) for x in ref)
        manifest = {"format": fmt, "from": "merged/", "loads": True,
                    "max_abs_logit_diff_vs_merged": max_diff(ref, got), "logit_scale": scale,
                    "note": "quantisation error, reported and not judged: the unquantised merged/ is the reference"}
        manifest["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        fsutil.atomic_write_json(tmp / "export_manifest.json", manifest, indent=2, sort_keys=True)
    return target


def _part_names(kept, all_names) -> list[str]:
    """Readable names of the copied parts: the top module, or two levels where the top module
    also holds trained tensors (Baichuan's audio_tokenizer.audio_decoder beside its encoder)."""
    kept = set(kept)
    trained_tops = {n.split(".", 1)[0] for n in all_names if n not in kept}
    return sorted({".".join(k.split(".")[:2]) if k.split(".", 1)[0] in trained_tops else k.split(".", 1)[0]
                   for k in kept})


def _staged(target: Path):
    """A temporary folder beside `target`, renamed into place when the block completes and
    removed when it raises: an export is either all there or not there at all; an existing one
    is replaced only when ours, and kept as `<target>.old` until the new one is in place."""
    return fsutil.staged_dir(target, legacy=legacy_export, kill_env=EXPORT_KILL)
