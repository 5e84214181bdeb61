"""What would make a packed training step wait for the GPU, counted on the CPU.

A step should be GPU compute: every read of a device value by the host (`.item()`, `.tolist()`,
a data-dependent output size such as `nonzero`) stalls the queue. The ops that do so on CUDA
are seen here with a TorchDispatchMode; `Tensor.tolist` (and friends) reach no dispatcher on
the CPU, so they are wrapped. Each is attributed to where it happens: the LLM's decoder, the
vision tower, the audio tower, the glue in between (the model's own forward around them), or
the backward pass. The run uses the sync-free CPU kernel (kernels.CPU_KERNEL = "dense"), which
stands in for CUDA's varlen kernel: both take device boundaries and a host maximum length.

Inside the LLM and the towers the count must be zero. What remains in the glue is named below
with its reason (transformers' own checks and splits, once per step, not per layer).
"""

from __future__ import annotations


import pytest

from sync_counter import GLUE, counting, packed_step, regions

@pytest.mark.parametrize("recipe_name", ["medical-tiny", "medical-baichuan-tiny"])
def test_no_host_sync_inside_the_llm_and_the_towers(media_dir, recipe_name, monkeypatch):
    fam, loaded, model, batch, kernels = packed_step(None, recipe_name, media_dir)
    monkeypatch.setattr(kernels, "CPU_KERNEL", "dense")  # stands in for CUDA's varlen kernel (no host read)
    labels = batch.pop("labels")
    with counting(regions(fam, model)) as c:
        out = model(**batch, labels=labels)
        c.region = "backward"
        out.loss.backward()
    inside = {k: n for k, n in c.seen.items() if k[0] in ("llm", "vision", "audio", "backward")}
    assert inside == {}, inside
    assert {k: n for k, n in c.seen.items() if k[0] == "glue"} == GLUE[fam.name]


def test_the_counter_sees_what_it_should(media_dir):
    """Without the collator's tower inputs the vision tower computes its windows itself, with host
    reads in every call: the counter must see them in the vision region."""
    fam, loaded, model, batch, kernels = packed_step(None, "medical-tiny", media_dir)
    for k in [k for k in batch if k.startswith(("image_", "video_")) and not k.endswith("grid_thw")]:
        batch.pop(k)  # the tower inputs: position ids, boundaries, window order
    labels = batch.pop("labels")
    with counting(regions(fam, model)) as c:
        model(**batch, labels=labels)
    assert sum(n for (region, _), n in c.seen.items() if region == "vision") > 0, c.seen
