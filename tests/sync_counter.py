"""Counting what would make a step wait for the GPU (tests/test_host_syncs.py says why and what is
allowed): a TorchDispatchMode that sees the ops that read device values, Tensor methods wrapped
where no dispatcher is reached on the CPU, each count attributed to a region (the LLM, a tower,
the glue, the backward); one packed step of a tiny family to count over."""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.models import load_spec
from media_samples import MIXES, sample

# aten ops whose output size or value the host must read from the device on CUDA
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim",
            "bincount", "histc", "equal", "is_nonzero"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.region = "glue"
        self.seen: collections.Counter = collections.Counter()
        self.trace = False
        self.where: dict = collections.defaultdict(set)

    def note(self, what: str):
        self.seen[(self.region, what)] += 1
        if self.trace:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-2] if "test_host_syncs" not in f.filename
                      and "/torch/" not in f.filename]
            self.where[(self.region, what)].add(" < ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}"
                                                           for f in frames[-3:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.note(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and any(
                isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[:2]):
            self.note("repeat_interleave")  # tensor repeats without output_size: the size is read
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.note(f"{name}(bool mask)")  # boolean-mask indexing runs nonzero inside
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting(regions: dict):
    """Count sync points, attributing them to the modules in `regions` (name -> modules)."""
    counter = Counter()
    hooks = []
    for region, modules in regions.items():
        for m in modules:
            def pre(mod, args, kwargs, region=region):
                mod._sync_outer = counter.region
                counter.region = region

            def post(mod, args, kwargs, out):
                counter.region = mod._sync_outer

            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
    wrapped = {}
    for meth in ("tolist", "item", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, meth)
        wrapped[meth] = orig

        def wrapper(self, *a, _orig=orig, _meth=meth, **k):
            counter.note(f"Tensor.{_meth}")
            return _orig(self, *a, **k)

        setattr(torch.Tensor, meth, wrapper)
    try:
        with counter:
            yield counter
    finally:
        for meth, orig in wrapped.items():
            setattr(torch.Tensor, meth, orig)
        for h in hooks:
            h.remove()


def packed_step(fam, recipe_name, media_dir, overrides=()):
    """One packed training step (forward with the loss, backward) as training runs it."""
    from finetune import adapters, attention, kernels
    from finetune.families import family_for
    from finetune.packing import pack_encoded
    from finetune.recipe import load_recipe
    from finetune.verify import to_model

    recipe = load_recipe(recipe_name, ["model.max_pixels=12544", *overrides])
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    attention.apply_to_llm(loaded.model, "varlen")
    attention.apply_to_encoders(loaded.model, fam)
    model, _ = adapters.apply_roles(loaded.model, fam, recipe, gradient_checkpointing=True)
    rope = fam.rope_index(loaded.model)
    rows = [[fam.encode(sample(media_dir, MIXES[m], answer="Yes. A lesion."), loaded.processor, rope=rope)
             for m in ("all", "two_images", "audio", "image", "text", "video", "all")]]
    batch = pack_encoded(fam, rows, loaded.processor.pad_id, with_varlen_args=True, towers=fam.tower_inputs(loaded.model))
    batch = to_model(batch, model, fam)
    model.train()
    return fam, loaded, model, batch, kernels


def regions(fam, model):
    if fam.name == "qwen2_5_omni":
        llm = fam.submodule(model, "model.language_model").layers
        return {"llm": list(llm), "vision": [fam.submodule(model, "model.visual")],
                "audio": [fam.submodule(model, "model.audio_tower")]}
    return {"llm": list(fam.submodule(model, "model.layers")), "vision": [fam.submodule(model, "model.visual_model")],
            "audio": [fam.submodule(model, "audio_tokenizer")]}


# What stays, per family, for one packed row holding images, a video and audio: each is once per
# step or per modality, outside the decoder layers and the towers, in transformers' own code.
GLUE = {
    "qwen2_5_omni": {
        # Qwen2_5OmniThinkerModel.get_audio_features flattens the padded features by their mask
        # (`input_features.permute(0, 2, 1)[mask.bool()]`)
        ("glue", "index(bool mask)"): 1,
        # get_image_features / get_video_features split the merged rows per image (`.tolist()`),
        # get_audio_features checks the tower's rows against `sum(lengths.tolist())`
        ("glue", "Tensor.tolist"): 3,
        # get_placeholder_mask: the image and video placeholder counts checked against the features,
        # and formatted into the check's message (two reads each)
        ("glue", "Tensor.item"): 4,
        # the same four, and create_causal_mask's packed-row detection (find_packed_sequence_indices)
        ("glue", "_local_scalar_dense"): 5,
        ("glue", "Tensor.__bool__"): 1,
    },
    # ours: the placeholder checks are asynchronous, and with the collator's boundaries no mask is built
    "baichuan_omni": {},
}
