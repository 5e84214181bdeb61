"""`python -m finetune <command>`: fine-tune omni-modal models from a recipe.

commands:
  run RECIPE           train, evaluate (base vs tuned) and export, in one go (`make finetune`)
  train RECIPE         train the recipe's adapters (resumes a killed run)
  eval RUN|RECIPE      held-out metrics, base vs tuned
  export RUN|RECIPE    merged, verified checkpoint (and/or the adapter); --force replaces one
  data check [FILES]   report every problem of datasets (the recipe's own with --recipe R)
  data convert         LLaMA-Factory / ms-swift / OpenAI files or a table + template -> our JSONL
  demo medical         write the synthetic medical dataset
  verify packing R     packed vs one-by-one logits, loss and gradients on the recipe's data
  plan RECIPE          GPU memory of a recipe from its config alone (--gpu 24GB --gpus N)
  chat TARGET          talk to the tuned model in the terminal (--prompt ... answers once, for scripts)
  serve TARGET         a local web page: ask with an image, audio or video, base and tuned side by side
  recipes              list the recipes

Every command that takes a recipe also takes `key.path=value` overrides after it, before or after
its options. A recipe is a name (recipes/NAME.yaml), a YAML file, or a run's own recipe.yaml
(or its run folder). `eval` and `export` on a trained run apply every
override of eval.*, export.*, data.eval, data.on_error and data.allow_outside_paths; one that
changes what was trained (model, roles, data.train, train.*, ...) is refused, naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from finetune.errors import ConfigError, UserError


def _recipe(args):
    """The command's recipe with its overrides; a run folder stands for the recipe it was trained with."""
    from finetune.recipe import load_recipe
    from finetune.recipe.run import run_folder_of, trained_recipe_file

    folder = run_folder_of(args.recipe)
    target = trained_recipe_file(folder) if folder is not None and Path(args.recipe).is_dir() else args.recipe
    return load_recipe(target, overrides=args.overrides)


def _run(target: str, overrides):
    """The recipe and folder of an existing run (finetune.recipe.run.load_run), its notes printed."""
    from finetune.recipe.run import load_run

    run = load_run(target, overrides)
    for note in run.notes:
        print(f"note: {note}", flush=True)
    return run


def run_stages(recipe) -> Path:
    """Train a staged recipe's stages in order, each from the one before's merged, verified export
    (finetune.stages); a stage done before is not run again, unless a stage before it was run now
    (its weights changed); returns the run folder, which holds the last stage's run."""
    from finetune.export import export_merged, recover
    from finetune.runtime import is_main_process, world_size
    from finetune.stages import begin
    from finetune.train import train

    if world_size() > 1:
        raise ConfigError("staged recipes run in one process for now (each stage's merged export is made by "
                          "one process and read by the next stage); run it without torchrun / GPUS=1")
    stages = begin(recipe)
    changed = False
    for i, (name, folder, rec, done) in enumerate(stages):
        head = f"stage {i + 1}/{len(stages)} {name!r}"
        if done and not changed:
            print(f"{head}: done before ({folder / 'merged'}), not run again", flush=True)
            continue
        print(f"{head}: training in {folder}/" + (f", from {rec.model.path}" if i else ""), flush=True)
        train(rec)
        changed = True
        if i < len(stages) - 1 and is_main_process():
            recover(folder / "merged")
            export_merged(folder, rec, force=True)
            print(f"{head}: merged into {folder / 'merged'} (verified), the next stage's model", flush=True)
    return Path(recipe.run_dir)


def train_recipe(recipe) -> Path:
    """Train a recipe: its stages in order (run_stages), or the recipe itself (finetune.train)."""
    if recipe.stages:
        return run_stages(recipe)
    from finetune.train import train

    return train(recipe)


def cmd_train(args) -> int:
    run_dir = train_recipe(_recipe(args))
    print(f"adapter: {run_dir / 'adapter'}")
    return 0


def cmd_eval(args) -> int:
    from finetune.evaluate import evaluate
    from finetune.report import summary_line

    run = _run(args.recipe, args.overrides)
    r = evaluate(run.recipe, run.run_dir)
    print(f"eval: {summary_line(r)}")
    print(f"eval report: {run.run_dir / 'eval.md'}")
    if r.get("report"):
        print(f"eval page:   {r['report']}")
    return 0


def cmd_export(args) -> int:
    from finetune.export import export_run
    from finetune.stages import final_recipe

    run = _run(args.target, args.overrides)
    # a staged run's folder holds its last stage: that stage's recipe made the adapter
    out = export_run(run.run_dir, force=args.force, fmt=args.format, recipe=final_recipe(run.recipe))
    for kind, path in out.items():
        line = f"{kind} export: {path}"
        if kind == "merged":
            m = json.loads((path / "export_manifest.json").read_text())
            line += (f"  ({m['layout']}, {m['dtype']}; verified: max |logit diff| {m['verify']['max_abs_diff']:.2e} "
                     f"<= {m['verify']['tolerance']:.1e})")
        print(line)
    return 0


def cmd_run(args) -> int:
    """train -> eval (base vs tuned) -> export, then say where everything is."""
    from finetune.evaluate import evaluate
    from finetune.export import check_targets, export_run
    from finetune.report import summary_line
    from finetune.runfolder import check_run_dir

    t0 = time.time()
    recipe = _recipe(args)
    # `run` replaces the exports it made before: what it may not replace stops it before training
    check_run_dir(recipe.run_dir)
    check_targets(recipe.run_dir, recipe)
    run_dir = train_recipe(recipe)
    r = evaluate(recipe, run_dir)
    out = export_run(run_dir, force=True)  # only exports of ours are replaced (fsutil.staged_dir)
    print()
    print(f"done in {time.time() - t0:.0f} s")
    print(f"  run folder   {run_dir}/")
    print(f"  adapter      {run_dir / 'adapter'}/  (PeftModel.from_pretrained)")
    print(f"  metrics      {run_dir / 'metrics.jsonl'}, {run_dir / 'loss_curve.svg'}, {run_dir / 'tensorboard'}/")
    print(f"  eval         {run_dir / 'eval.md'}: {summary_line(r)}")
    if r.get("report"):
        print(f"  eval page    {r['report']}  (metrics, loss curve, examples; opens offline)")
    for kind, path in out.items():
        print(f"  {kind:<12} {path}/")
    return 0


def cmd_data_convert(args) -> int:
    from finetune.data.convert import main as convert_main

    return convert_main(args.rest)


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def cmd_data_check(args) -> int:
    """Check dataset files; with --recipe, as that recipe's model will read them (token counts,
    data.max_tokens, and each sample encoded as training encodes it). Without files: the
    recipe's own data.train and data.eval."""
    from finetune.data.check import check_dataset
    from finetune.data.schema import Limits

    files = [f for f in args.files if not _OVERRIDE.match(f)]
    overrides = [f for f in args.files if _OVERRIDE.match(f)]
    if overrides and not args.recipe:
        raise ConfigError(f"data check: overrides such as {overrides[0]} need --recipe")
    recipe = family = proc = None
    if args.recipe:
        from finetune.data.reading import prepare_data
        from finetune.models import family_of, model_folder, processor_of
        from finetune.recipe import load_recipe

        recipe = load_recipe(args.recipe, overrides=overrides)
        if not files:
            prepare_data(recipe)  # the demo recipes' synthetic data, as training would write it
            # a plain path is checked as a file (other JSONL formats converted); a source with a hub id,
            # columns, a split or a format is read as training reads it
            files = [s if (s.hub or s.columns or s.split or s.format != "auto") else s.path
                     for s in recipe.data.sources() if s.path or s.hub] + ([recipe.data.eval] if recipe.data.eval else [])
        family = family_of(recipe)
        folder = model_folder(recipe, family)
        proc = processor_of(recipe, family, folder)
    if not files:
        raise ConfigError("data check: name the dataset files, or a recipe (--recipe R) whose data to check")
    report = check_dataset([Path(f) if isinstance(f, str) else f for f in files], family=family, processor=proc,
                           config=family.read_config(folder) if family else None,
                           max_tokens=recipe.data.max_tokens if recipe else None,
                           limits=Limits.of(recipe.data) if recipe else None,
                           allow_outside_paths=args.allow_outside_paths or bool(recipe and recipe.data.allow_outside_paths),
                           open_media=not args.no_media)
    print(report.format())
    if report.errors and recipe is not None and recipe.data.on_error == "skip" and report.n_ok \
            and all(e.line for e in report.errors):
        # what training does with them: each sample is left out and counted; a file-level problem still stops it
        bad = len({(e.file, e.line) for e in report.errors})
        print(f"data.on_error: skip: the run leaves out the {bad} sample(s) above (skipped and counted) and uses "
              f"the {report.n_ok} good one(s)")
        return 0
    return 1 if report.errors else 0


def cmd_demo(args) -> int:
    from finetune.demo_data import generate_medical

    paths = generate_medical(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, force=args.force)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_verify(args) -> int:
    """Packed vs one-by-one forward/backward on the recipe's model and data."""
    from finetune.verify import verify_packing

    res = verify_packing(_recipe(args), n_samples=args.samples, device=args.device, dtype=args.dtype,
                         attn=args.attn)
    print(res.format())
    return 0 if res.passed else 1


def cmd_plan(args) -> int:
    """Memory plan of a recipe, from its config only (no weights are loaded)."""
    from finetune.plan import format_plan, plan

    gpu = str(args.gpu).upper().removesuffix("GB").removesuffix("G").strip()
    print(format_plan(plan(_recipe(args), gpu_gb=float(gpu), gpus=args.gpus)))
    return 0


def cmd_chat(args) -> int:
    """Chat with a run's tuned model (or an export, or a recipe's base) in the terminal."""
    from finetune.chat import answer_once, interactive
    from finetune.inference import open_model

    assistant = open_model(args.target, args.overrides, system=args.system, device=args.device)
    if args.max_new_tokens:
        assistant.max_new_tokens = args.max_new_tokens
    if args.prompt is None:
        return interactive(assistant, tuned=not args.base, attachments=args.attachments)
    for note in assistant.notes:
        print(f"note: {note}", file=sys.stderr)
    print(answer_once(assistant, args.prompt, args.attachments, tuned=not args.base and assistant.has_adapter))
    return 0


def cmd_serve(args) -> int:
    """The local page: base and tuned answers side by side, the run's evaluation and training."""
    from finetune.inference import open_model
    from finetune.serve import require_gradio, serve

    require_gradio()  # before the model loads
    assistant = open_model(args.target, args.overrides, system=args.system, device=args.device)
    return serve(assistant, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)


class _Attach(argparse.Action):
    """--image/--audio/--video: (kind, path) pairs in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.attachments = [*(getattr(namespace, "attachments", None) or []), (self.dest, values)]


def _target_options(sp) -> None:
    sp.add_argument("target", help="a run folder (or its recipe.yaml), an export folder (runs/x/merged) or a recipe")
    sp.add_argument("overrides", nargs="*", help="eval.* overrides of a run, e.g. eval.max_new_tokens=64")
    sp.add_argument("--system", help="the system prompt (default: the run's data.system_prompt; an export folder "
                                     "carries its text only when exported with export.include_data_details)")
    sp.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")


def cmd_recipes(args) -> int:
    from finetune.recipe import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<28} {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_cmd(name, fn, help_, what="recipe name (recipes/NAME.yaml) or path, or a run's recipe.yaml"):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help=what)
        sp.add_argument("overrides", nargs="*", help="overrides such as train.lr=1e-4 data.max_tokens=2048")
        sp.set_defaults(fn=fn)
        return sp

    recipe_cmd("train", cmd_train, "train the recipe's adapters")
    recipe_cmd("eval", cmd_eval, "evaluate base vs tuned on the held-out split",
               "a run folder (or its recipe.yaml), or the recipe that trained it")
    recipe_cmd("run", cmd_run, "train, evaluate and export")
    ex = sub.add_parser("export", help="merge and export a run (RUN_DIR or recipe name)")
    ex.add_argument("target", help="a run folder (or its recipe.yaml), or the recipe that trained it")
    ex.add_argument("overrides", nargs="*", help="export.*, eval.*, data.eval ... overrides, e.g. export.dtype=bfloat16")
    ex.add_argument("--force", action="store_true", help="replace an existing export")
    ex.add_argument("--format", choices=["merged", "adapter", "both"], default=None)
    ex.set_defaults(fn=cmd_export)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    chk = dsub.add_parser("check", help="report every problem of datasets (FILES, or the recipe's data)")
    chk.add_argument("files", nargs="*", metavar="FILE|key=value",
                     help="dataset files (default: the recipe's data.train and data.eval) and recipe overrides")
    chk.add_argument("--recipe", help="read the data as this recipe's model does: token counts, data.max_tokens, "
                                      "each sample encoded as in training")
    chk.add_argument("--no-media", action="store_true", help="do not decode media files")
    chk.add_argument("--allow-outside-paths", action="store_true")
    chk.set_defaults(fn=cmd_data_check, overrides=[])
    conv = dsub.add_parser("convert", help="other formats (LLaMA-Factory, ms-swift, OpenAI) or a table + template "
                                           "-> our JSONL", add_help=False)
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    conv.set_defaults(fn=cmd_data_convert, overrides=[])

    demo = sub.add_parser("demo", help="generate a synthetic dataset")
    demo.add_argument("kind", choices=["medical"])
    demo.add_argument("out", nargs="?", default="data/demo/medical")
    demo.add_argument("--n-train", type=int, default=400)
    demo.add_argument("--n-eval", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(fn=cmd_demo)

    ver = sub.add_parser("verify", help="checks a user can run: `verify packing RECIPE`")
    ver.add_argument("what", choices=["packing"])
    ver.add_argument("recipe")
    ver.add_argument("overrides", nargs="*")
    ver.add_argument("--samples", type=int, default=8, help="how many samples of the recipe's data")
    ver.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ver.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                     help="default: float32 on the CPU, the recipe's training precision on CUDA")
    ver.add_argument("--attn", help="the LLM's attention for the packed pass (default: what training picks)")
    ver.set_defaults(fn=cmd_verify)

    pl = recipe_cmd("plan", cmd_plan, "estimate GPU memory of a recipe without loading weights (model.path "
                                      "may be config:<name> of a config in finetune/configs/, e.g. config:qwen2_5_omni_7b)")
    pl.add_argument("--gpu", default="24GB", help="memory of one GPU, e.g. 24GB or 80")
    pl.add_argument("--gpus", type=int, default=1, help="number of GPUs (per-GPU memory under the recipe's strategy "
                                                        "and a table of every strategy)")

    ch = sub.add_parser("chat", help="talk to the tuned model: /image /audio /video PATH attach, /base /tuned "
                                     "switch the adapter, --prompt answers once")
    _target_options(ch)
    ch.add_argument("--prompt", help="answer this once and exit (prints the answer alone)")
    for kind in ("image", "audio", "video"):
        ch.add_argument(f"--{kind}", dest=kind, action=_Attach, metavar="PATH",
                        help=f"attach a{'n' if kind[0] in 'aeiou' else ''} {kind} file (repeatable; kept in order)")
    ch.add_argument("--base", action="store_true", help="answer with the adapter off (the base model)")
    ch.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    ch.set_defaults(fn=cmd_chat, attachments=[])

    sv = sub.add_parser("serve", help="a local web page: base and tuned answers side by side, the run's "
                                      "evaluation and training progress")
    _target_options(sv)
    sv.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free one")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); another address "
                                                        "exposes the page and the data it shows")
    sv.add_argument("--max-upload-mb", type=float, default=256, help="the largest upload (default 256 MB)")
    sv.set_defaults(fn=cmd_serve)

    rc = sub.add_parser("recipes", help="list the recipes")
    rc.set_defaults(fn=cmd_recipes)
    for depth, parsers in ((1, sub.choices), (2, dsub.choices)):
        for leaf in parsers.values():
            if leaf is not data:
                leaf.set_defaults(_leaf=None if leaf is conv else (leaf, depth))
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line with options and overrides (or files) in any order: the command is picked
    first, then its own parser reads the rest intermixed (`plan medical --gpu 24GB model.path=...`
    as `plan medical model.path=... --gpu 24GB`)."""
    args, _ = build_parser().parse_known_args(argv)
    if args._leaf is None:  # data convert: its own parser
        return args
    leaf, depth = args._leaf
    return argparse.Namespace(**{**vars(args), **vars(leaf.parse_intermixed_args(argv[depth:]))})


def main(argv: list[str] | None = None) -> int:
    """Entry point. A user error (a recipe value, a dataset line, a missing file or extra) is printed
    as one line that says what to do, exit status 2; anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "convert"]:  # its own parser (options come before the files)
        from finetune.data.convert import main as convert_main

        return convert_main(argv[2:])
    args = parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our output went away (`data check ... | head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
