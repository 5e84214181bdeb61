"""finetune.checkpoint: the sharded safetensors files exports write, reproducible byte for byte.

The shard plan is ours, not huggingface_hub's `split_torch_state_dict_into_shards`: that one names a
single shard `model.safetensors` without an index, and it closes a tensor larger than the limit into a
shard of its own ahead of the shard it is filling (which then keeps filling past it), so its shards
neither follow name order nor number as ours do; and it sizes tensors from their storage, which
needs them in memory, where ours reads the sizes from the safetensors headers. These tests hold the
plan exports have always had (exports are compared byte for byte across versions).
"""

from __future__ import annotations

import json

import torch

from finetune.checkpoint import INDEX_NAME, tensors_of, write_sharded


def index_of(folder) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def test_shards_are_filled_in_name_order_and_a_tensor_over_the_limit_has_one_of_its_own(tmp_path):
    """Tensors go to shards in name order, a shard closing before the tensor that would overflow it;
    a tensor over the limit stands alone in the shard where its name puts it."""
    tensors = {"d": torch.zeros(10), "a": torch.zeros(10), "c": torch.zeros(10), "b": torch.arange(100.0)}  # 40, 400 B
    files = write_sharded(tensors, tmp_path, 100)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == names + [INDEX_NAME]
    assert index_of(tmp_path) == {"metadata": {"total_size": 520},
                                  "weight_map": {"a": names[0], "b": names[1], "c": names[2], "d": names[2]}}
    assert (tmp_path / INDEX_NAME).read_text().endswith("}\n")  # indent 2, sorted keys, one newline
    assert torch.equal(tensors_of(tmp_path)["b"].load(), torch.arange(100.0))


def test_one_shard_is_numbered_and_indexed_like_many(tmp_path):
    files = write_sharded({"w": torch.ones(3, 2, dtype=torch.bfloat16)}, tmp_path, "5GB")
    assert files == ["model-00001-of-00001.safetensors", INDEX_NAME]
    assert index_of(tmp_path) == {"metadata": {"total_size": 12}, "weight_map": {"w": files[0]}}


def test_the_same_tensors_give_the_same_bytes_from_memory_and_from_disk(tmp_path):
    """Tensors in memory, and the same tensors read lazily from a checkpoint on disk (how exports
    copy the base's), are written to identical files."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(64, 32, generator=g) for i in range(6)}
    tensors["layer.0.bias"] = torch.randn(7, generator=g).to(torch.float16)
    first, again, lazy = tmp_path / "first", tmp_path / "again", tmp_path / "lazy"
    for folder in (first, again):
        folder.mkdir()
        write_sharded(tensors, folder, "20KB")
    lazy.mkdir()
    write_sharded(tensors_of(first), lazy, "20KB")
    written = sorted(p.name for p in first.iterdir())
    assert len(written) > 2  # several shards
    for folder in (again, lazy):
        assert sorted(p.name for p in folder.iterdir()) == written
        assert all((folder / n).read_bytes() == (first / n).read_bytes() for n in written)


def test_raw_equal_compares_scalar_tensors_of_any_dtype(tmp_path):
    """A checkpoint's 0-dim tensors (a batch norm's num_batches_tracked, int64) compare by their
    bytes like any other tensor (the export's bit-identity check reads every base tensor)."""
    from safetensors.torch import save_file

    from finetune.checkpoint import raw_equal

    for name, scalar in (("a", 1.5), ("b", 2.5)):
        (tmp_path / name).mkdir()
        save_file({"n": torch.tensor(3), "x": torch.tensor(scalar), "v": torch.arange(4)},
                  str(tmp_path / name / "model.safetensors"))
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert raw_equal(a["n"], b["n"]) and raw_equal(a["v"], b["v"])
    assert not raw_equal(a["x"], b["x"])

