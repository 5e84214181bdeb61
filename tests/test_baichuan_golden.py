"""Our Baichuan-Omni-1.5 against numbers recorded from the released reference code, on every run.

tests/data/baichuan_golden/ holds what the reference model (OmniForCausalLM from
baichuan-inc/Baichuan-Omni-1.5, shrunk, seeded weights) gave in tests/baichuan_ref/build_reference.py
--golden: reduced logits on text, image, video, audio, image+audio and a packed row, the audio codes,
the processor's inputs and intermediate summaries, and its token ids for two chat samples. Here
the same weights and media are regenerated from tests/baichuan_ref/golden_recipe.py (no reference
code, no network), loaded into our implementation through from_pretrained, run through our
processor and model, and compared. The format is described in tests/baichuan_ref/README.md.

The control tests break one weight mapping at a time in the loaded model and check that the
comparison then fails; tests/test_baichuan_reference.py keeps the live, opt-in comparison.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "baichuan_golden"
sys.path.insert(0, str(HERE / "baichuan_ref"))
import golden_recipe  # noqa: E402

SPEECH = ("audio_head.", "audio_tokenizer.audio_decoder.", "audio_tokenizer.audio_flow_matching_decoder.")
CASES = ["text", "image", "video", "audio", "image_audio", "packed_text_image"]

# Tolerances, fp32 on the CPU (test_golden_numbers_match prints the measured figures). Our model
# agrees with the reference to about 1e-5 on the logits: at most 4.6e-6 at the recorded columns,
# 8e-6 over all logits in the opt-in comparison. The differences are float32 rounding in other
# kernel orders (SDPA against the reference's attention, the vision rope). A broken mapping moves
# logits by 1 or more (the controls below), so 1e-4 leaves a factor of 10 above the noise and
# 10000 below the effect of a mistake.
TOL = {
    # inputs from our processor, [rows, 2] sums and sums of squares per patch row (1176 values)
    # or mel bin: the patches differ from the reference's by float32 rounding only (<= 2.4e-7 per
    # value; measured 1.3e-4 on a row), while one pixel level off moves a row sum by 1/255/0.27 = 0.015
    "inputs": 2e-3,
    # per-position sums and sums of squares of 128 hidden values (the embeddings with the media
    # scattered in, measured 4.7e-5; the final normed hidden state, whose values are O(1), 6.3e-5)
    "inputs_embeds": 1e-4,
    "hidden": 1e-3,
    # the logits themselves at the recorded columns, and each row's mean, std, max and logsumexp
    "logits.cols": 1e-4,
    "logits.stats": 1e-4,
    # row . N(0,1) over 152064 columns: per-logit noise of a few 1e-6 adds up to ~1e-3 (sqrt(V)
    # times it; measured up to 1.5e-3), while a change of 1e-2 in every logit of a row moves it by ~4
    "logits.sketch": 2e-2,
}
# A code can only be expected to match where the reference's best and second-best VQ distances
# differ by more than float32 noise on the encoder output; nearer ties are compared given the
# reference's codes instead (the margins are recorded with the codes).
CODE_MARGIN = 1e-4


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    g = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))
    weights = json.loads((DATA / "weights.json").read_text(encoding="utf-8"))
    return g, weights, load_file(str(DATA / "golden.safetensors"))


@pytest.fixture(scope="module")
def media(golden, tmp_path_factory):
    g, _, _ = golden
    return golden_recipe.make_media(tmp_path_factory.mktemp("baichuan_golden_media"), g["seed"])


@pytest.fixture(scope="module")
def weights(golden):
    g, entries, _ = golden
    return golden_recipe.make_state_dict({k: rule for k, (rule, _) in entries.items()}, g["seed"])


@pytest.fixture(scope="module")
def ours(golden, weights, tmp_path_factory):
    """Our model loaded through from_pretrained from a folder laid out as the reference saved it."""
    from safetensors.torch import save_file

    from finetune.families.baichuan_model import BaichuanOmniForCausalLM

    folder = tmp_path_factory.mktemp("baichuan_golden_model")
    for f in (DATA / "model").iterdir():
        shutil.copy(f, folder / f.name)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, info = BaichuanOmniForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True,
                                                           attn_implementation="sdpa")
    return model.eval(), info, folder


@pytest.fixture(scope="module")
def processor(ours):
    from finetune.families.baichuan_omni import BaichuanProcessor

    return BaichuanProcessor.from_folder(ours[2])


# ---- running a case and comparing it -----------------------------------------------------------
def _inputs(cid: str, meta: dict, proc, media: dict, tensors: dict, fails: list, figures: dict) -> dict:
    """Our processor's media inputs for a case, each checked against the reference's."""
    from PIL import Image

    from finetune.data.media import load_audio

    def check(key, x):
        want = tensors[f"{cid}.{key}.stats"]
        got = golden_recipe.row_stats(x)
        if got.shape != want.shape:
            fails.append(f"{cid}: {key} from our processor has shape {tuple(x.shape)}, rows {got.shape[0]} "
                         f"!= the reference's {want.shape[0]}")
            return
        d = float((got - want).abs().max())
        figures[key] = d
        if d > TOL["inputs"]:
            fails.append(f"{cid}: {key} from our processor differ from the reference's: row stats max|diff| "
                         f"{d:.2e} > {TOL['inputs']:.0e}")

    kw: dict = {}
    if meta.get("images"):
        pix, grids = [], []
        for i, name in enumerate(meta["images"]):
            with Image.open(media[name]) as im:
                pv, grid = proc.process_image(im)
            check(f"images.{i}", pv)
            pix.append(pv)
            grids.append(grid)
        kw["pixel_values"], kw["image_grid_thw"] = torch.cat(pix), torch.stack(grids)
        if kw["image_grid_thw"].tolist() != meta["images_grid"]:
            fails.append(f"{cid}: image grids {kw['image_grid_thw'].tolist()} != the reference's {meta['images_grid']}")
    if meta.get("videos"):
        frames_proc = proc.frame_view()  # each frame is its own image, with the video pixel limit
        pix, grids = [], []
        for frames in meta["videos"]:
            for name in frames:
                with Image.open(media[name]) as im:
                    pv, grid = frames_proc.process_image(im)
                check(f"videos.{len(pix)}", pv)
                pix.append(pv)
                grids.append(grid)
        kw["pixel_values_videos"], kw["video_grid_thw"] = torch.cat(pix), torch.stack(grids)
        if kw["video_grid_thw"].tolist() != meta["videos_grid"]:
            fails.append(f"{cid}: frame grids {kw['video_grid_thw'].tolist()} != the reference's {meta['videos_grid']}")
    if meta.get("audios"):
        feats = []
        for name in meta["audios"]:
            feats.extend(proc.process_audio_segments(load_audio(media[name], proc.sampling_rate)))
        for i, mel in enumerate(feats):
            check(f"audios.{i}", mel)
        kw["audio_features"] = feats
    return kw


def _close(cid: str, key: str, got: torch.Tensor, want: torch.Tensor, fails: list, figures: dict, where=None):
    d = (got.double() - want.double()).abs()
    worst = float(d.max())
    figures[key] = worst
    if worst > TOL[key] or not torch.isfinite(got).all():
        at = divmod(int(d.argmax()), d.shape[-1]) if d.dim() == 2 else (int(d.argmax()),)
        extra = f" at {where(at)}" if where else ""
        fails.append(f"{cid}: {key} max|diff| {worst:.2e} > {TOL[key]:.0e}{extra}")


def run_case(model, proc, golden, media, cid: str) -> tuple[list[str], dict]:
    """Run one recorded case through our processor and model; (failure lines, measured figures)."""
    g, _, tensors = golden
    meta = g["cases"][cid]
    fails: list[str] = []
    figures: dict = {}
    ids = torch.tensor(meta["input_ids"])[None]
    key = (id(proc), cid)
    if key not in _INPUTS:  # the processor's part does not depend on the weights: once per case
        in_fails: list = []
        in_figures: dict = {}
        kw = _inputs(cid, meta, proc, media, tensors, in_fails, in_figures)
        _INPUTS[key] = proc, kw, in_fails, in_figures  # holding proc keeps its id from being reused
    _, kw, in_fails, in_figures = _INPUTS[key]
    kw = dict(kw)
    fails += in_fails
    figures.update(in_figures)
    if fails:
        return fails, figures
    if "audio_features" in kw:
        want = tensors[f"{cid}.audio_codes"]
        with torch.no_grad():
            codes = model.audio_tokenizer.encode(kw["audio_features"])
        if codes.shape != want.shape:
            fails.append(f"{cid}: audio codes of shape {tuple(codes.shape)} != the reference's {tuple(want.shape)}")
            return fails, figures
        differ = codes != want
        clear = tensors[f"{cid}.vq_margins"] > CODE_MARGIN
        figures["audio codes equal"] = f"{int((~differ).sum())}/{differ.numel()}"
        if (differ & clear).any():
            r, c = (differ & clear).nonzero()[0].tolist()
            fails.append(f"{cid}: audio codes differ from the reference's at {int((differ & clear).sum())} of "
                         f"{int(clear.sum())} clear-margin codes, first at row {r} stage {c} "
                         f"(ours {int(codes[r, c])}, reference {int(want[r, c])})")
            return fails, figures
        if differ.any():  # only near ties: the rest of the comparison takes the reference's codes
            kw = {k: v for k, v in kw.items() if k != "audio_features"} | {"audio_codes": want}
    if "packed_lengths" in meta:
        # one row with two samples: ours restarts positions per sample and builds a block-diagonal
        # mask from them (the reference takes seqlens; RoPE is relative, so the logits agree)
        kw["position_ids"] = torch.cat([torch.arange(n) for n in meta["packed_lengths"]])[None]
        kw["use_cache"] = False
    else:
        kw["attention_mask"] = torch.ones_like(ids)

    seen: dict = {}

    def first_layer_input(module, args, kwargs):  # the embeddings with the media scattered in
        seen["inputs_embeds"] = args[0] if args else kwargs["hidden_states"]

    def final_norm_output(module, args, out):
        seen["hidden"] = out

    hooks = [model.model.layers[0].register_forward_pre_hook(first_layer_input, with_kwargs=True),
             model.model.norm.register_forward_hook(final_norm_output)]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, **kw).logits[0]
    finally:
        for h in hooks:
            h.remove()
    for key in ("inputs_embeds", "hidden"):
        _close(cid, key, golden_recipe.row_stats(seen[key][0]), tensors[f"{cid}.{key}.stats"], fails, figures,
               where=lambda at: f"position {at[0]}")
    columns = g["logits"]["columns"]
    red = golden_recipe.reduce_logits(logits, columns, _sketch(g))
    _close(cid, "logits.cols", red["cols"], tensors[f"{cid}.logits.cols"], fails, figures,
           where=lambda at: f"position {at[0]}, column {columns[at[1]]}")
    _close(cid, "logits.stats", red["stats"], tensors[f"{cid}.logits.stats"], fails, figures,
           where=lambda at: f"position {at[0]}, {('mean', 'std', 'max', 'logsumexp')[at[1]]}")
    _close(cid, "logits.sketch", red["sketch"], tensors[f"{cid}.logits.sketch"], fails, figures,
           where=lambda at: f"position {at[0]}")
    # the reference's best token must be (within tolerance) our best too
    ref_best = tensors[f"{cid}.logits.argmax"]
    gap = logits.max(-1).values - logits.gather(-1, ref_best[:, None])[:, 0]
    if float(gap.max()) > 2 * TOL["logits.stats"]:
        p = int(gap.argmax())
        fails.append(f"{cid}: at position {p} our best token is {int(logits[p].argmax())}, the reference's "
                     f"{int(ref_best[p])} is {float(gap[p]):.2e} below it")
    return fails, figures


_SKETCH: dict = {}
_INPUTS: dict = {}


def _sketch(g):
    key = (g["logits"]["vocab_size"], g["seed"])
    if key not in _SKETCH:
        _SKETCH[key] = golden_recipe.sketch_matrix(*key)
    return _SKETCH[key]


# ---- the tests --------------------------------------------------------------------------------
def test_recorded_data_is_small_and_complete(golden):
    g, entries, tensors = golden
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 400 * 1024, f"{DATA} holds {size} bytes"
    assert set(g["cases"]) == set(CASES)
    for cid in CASES:
        assert tensors[f"{cid}.logits.cols"].shape == (len(g["cases"][cid]["input_ids"]), len(g["logits"]["columns"]))
    assert {"audio", "image_audio"} <= {k.split(".")[0] for k in tensors if k.endswith(".audio_codes")}
    assert len(entries) == g["weights"]["entries"]


def test_the_seeded_media_are_the_reference_media(golden, media):
    g, _, _ = golden
    changed = [n for n, digest in g["media"].items() if golden_recipe.media_sha256(media[n]) != digest]
    assert not changed, (f"golden_recipe.make_media no longer reproduces {changed} (numpy's random stream or "
                         f"Pillow changed?); rebuild the golden numbers (tests/baichuan_ref/README.md)")


def test_the_weight_recipe_reproduces_the_reference_state_dict(golden, weights):
    g, entries, _ = golden
    digests = {k: golden_recipe.tensor_sha256(v) for k, v in weights.items()}
    changed = [k for k, (_, short) in entries.items() if digests[k][:16] != short]
    assert not changed, f"{len(changed)} regenerated tensors differ from the reference's, e.g. {changed[:3]}"
    assert golden_recipe.state_sha256(digests) == g["weights"]["state_dict_sha256"]


def test_our_model_loads_every_tensor_of_the_trained_parts(ours, weights):
    model, info, _ = ours
    assert not info["missing_keys"], sorted(info["missing_keys"])[:5]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(SPEECH)]
    assert not unexpected, unexpected[:5]
    state = model.state_dict()
    assert set(state) == {k for k in weights if not k.startswith(SPEECH)}
    differ = [k for k, v in state.items() if not torch.equal(v, weights[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("cid", CASES)
def test_golden_numbers_match(ours, processor, golden, media, cid):
    model, _, _ = ours
    fails, figures = run_case(model, processor, golden, media, cid)
    print(f"{cid}: " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    assert not fails, "\n".join(fails)


def _our_ids(processor, rec: dict, media: dict) -> list[int]:
    from finetune.data.schema import parse_sample
    from finetune.families.baichuan_omni import BaichuanOmniFamily

    folder = next(iter(media.values())).parent
    s = parse_sample({"messages": rec["messages"]}, source="golden.json", line=1, base_dir=folder)
    return BaichuanOmniFamily().encode(s, processor).input_ids.tolist()


@pytest.mark.parametrize("sample", ["image+audio", "text"])
def test_processor_token_ids_match_the_reference(golden, processor, media, sample):
    g, _, _ = golden
    rec = g["token_ids"]["samples"][sample]
    ids, want = _our_ids(processor, rec, media), rec["input_ids"]
    if ids != want:
        first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
        pytest.fail(f"{sample}: our ids differ from the reference's at {first} (ours {ids[first:first + 5]}, reference "
                    f"{want[first:first + 5]} = {rec['tokens'][first:first + 5]}); lengths {len(ids)} vs {len(want)}")
    # the recorded ids come from the real BPE (merges applied), not a byte-level fallback
    assert "merges.txt" in g["token_ids"]["tokenizer"] or "tokenizer.json" in g["token_ids"]["tokenizer"]
    text_bytes = sum(len(t.encode("utf-8")) for m in rec["messages"]
                     for t in ([m["content"]] if isinstance(m["content"], str) else
                               [p["text"] for p in m["content"] if p["type"] == "text"]))
    specials = set(processor.token_ids.values())
    assert sum(i not in specials for i in ids) < 0.6 * text_bytes


def test_token_ids_without_the_merges_do_not_match(golden, ours, media, tmp_path):
    """Control: the same vocabulary without its merges (byte-level only) gives other ids."""
    from finetune.families.baichuan_omni import BaichuanProcessor

    for f in ours[2].iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    rec = golden[0]["token_ids"]["samples"]["text"]
    ids = _our_ids(BaichuanProcessor.from_folder(tmp_path), rec, media)
    print(f"without merges: {len(ids)} ids, the reference {len(rec['input_ids'])}")
    assert ids != rec["input_ids"]


# ---- controls: one broken weight mapping must make the comparison fail ------------------------
def _swap_rows(t: torch.Tensor, a: slice, b: slice):
    x = t[a].clone()
    t[a] = t[b]
    t[b] = x


def _break_qk(model):
    """Layer 0's W_pack: the q rows of head 0 swapped with the k rows of kv head 0."""
    att = model.model.layers[0].self_attn
    q, k = slice(0, att.head_dim), slice(att.n_heads * att.head_dim, (att.n_heads + 1) * att.head_dim)
    _swap_rows(att.W_pack.weight, q, k)
    _swap_rows(att.W_pack.bias, q, k)


def _break_bridge(model):
    """The vision bridge's first Linear: the inputs of the first two patches of each 2x2 group swapped
    (a wrong merge order)."""
    w = model.model.visual_bridge_model.mlp[0].weight
    d = w.shape[1] // 4
    _swap_rows(w.T, slice(0, d), slice(d, 2 * d))


def _break_codebook(model):
    """The audio tokenizer's VQ: the codebooks of stages 2 and 3 swapped."""
    vq = model.audio_tokenizer.audio_bridge_model.vq_list
    a, b = vq[1].codebook.embed, vq[2].codebook.embed
    x = a.clone()
    a.copy_(b)
    b.copy_(x)


def _break_code_embedding(model):
    """The LLM's audio code embeddings: those of stages 2 and 3 swapped."""
    e = model.model.audio_embed_layers
    x = e[1].weight.clone()
    e[1].weight.copy_(e[2].weight)
    e[2].weight.copy_(x)


def _break_patch_embed(model):
    """The vision tower's patch embedding: RGB read as BGR."""
    w = model.model.visual_model.patch_embed.proj.weight
    w.copy_(w.flip(1))


# Each break is its own inverse (a swap or a flip): applied twice, the model is whole again.
BREAKS = {  # name: (break, cases that must fail, cases that must still pass)
    "q/k projection": (_break_qk, ["text", "image_audio"], []),
    "vision bridge merge order": (_break_bridge, ["image", "video", "packed_text_image"], ["audio"]),
    "vision patch embedding channels": (_break_patch_embed, ["image", "video"], ["text"]),
    "audio codebook": (_break_codebook, ["audio", "image_audio"], ["image"]),
    "audio code embeddings": (_break_code_embedding, ["audio", "image_audio"], ["video"]),
}


@contextlib.contextmanager
def broken(model, how, weights):
    with torch.no_grad():
        how(model)
    try:
        yield
    finally:
        with torch.no_grad():
            how(model)
        differ = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
        assert not differ, f"the model was not restored: {differ}"


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_weight_mapping_fails_the_comparison(ours, processor, golden, media, weights, name):
    model, _, _ = ours
    how, must_fail, must_pass = BREAKS[name]
    with broken(model, how, weights):
        results = {cid: run_case(model, processor, golden, media, cid)[0] for cid in must_fail + must_pass}
    for cid in must_fail:
        print(f"[{name}] {cid}: " + (" | ".join(results[cid]) or "PASSED"))
    assert all(results[cid] for cid in must_fail), {cid: results[cid] for cid in must_fail}
    assert not any(results[cid] for cid in must_pass), {cid: results[cid] for cid in must_pass}
