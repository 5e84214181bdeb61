"""Gemma 3n with a frozen vision path: each image's features computed once (FrozenImageCache) vs
the tower run on every use, side by side in one run on the same packed rows.

    python bench/frozen_image_cache.py                      # the CPU demo recipe, 30 rows
    python bench/frozen_image_cache.py --recipe medical-gemma3n-tiny --rows 60

Both arms share one model and take no optimizer step (the weights stay put, so both see the same
function): each row is run forward and backward with the cache on (warmed by one pass over the
rows, as from the second epoch on) and with it off, alternating, and the losses and every
trainable gradient must agree exactly. Prints milliseconds per row (forward + backward) and the
ratio; the optimizer step, the same in both arms, is not in the figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="medical-gemma3n-tiny")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from finetune import adapters, attention
    from finetune.data.schema import load_samples
    from finetune.families import family_for
    from finetune.models import load_spec
    from finetune.packing import pack_encoded, plan_bins
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    rec = load_recipe(a.recipe, a.overrides)
    fam = family_for(rec.model.path, rec.model.family)
    ld = fam.load(load_spec(rec, dtype=torch.float32, attn="sdpa"))
    rope = fam.rope_index(ld.model)
    samples, _ = load_samples(Path(rec.data.train if isinstance(rec.data.train, str) else "data/demo/medical/train.jsonl"))
    encs = [fam.encode(s, ld.processor, rope=rope) for s in samples]
    rows = [[encs[i] for i in b] for b in plan_bins([e.num_tokens for e in encs], rec.data.max_tokens)]
    random.Random(0).shuffle(rows)
    rows = rows[: a.rows]
    attention.apply_to_llm(ld.model, "varlen")
    torch.manual_seed(0)
    model, _ = adapters.apply_roles(ld.model, fam, rec)
    inner = model.base_model.model.model
    cache = getattr(inner, "_frozen_image_cache", None)
    if cache is None:
        sys.exit(f"{a.recipe}: its family keeps no frozen-image cache")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cache.path_state(torch.zeros(1, 3, 8, 8)) is None:
        sys.exit(f"{a.recipe}: the vision path trains, so nothing is cached")
    model.train()

    def step(row):
        b = pack_encoded(fam, [row], ld.processor.pad_id, with_varlen_args=True)
        lab = b.pop("labels")
        for p in trainable:
            p.grad = None
        t = time.perf_counter()
        out = model(**b).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), lab[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        return time.perf_counter() - t, loss.item(), [p.grad.clone() if p.grad is not None else None for p in trainable]

    capacity = cache.capacity
    for row in rows:  # warm the cache: every row's images once (the first epoch)
        step(row)
    on, off = [], []
    for row in rows:
        cache.capacity = capacity
        t_on, l_on, g_on = step(row)
        cache.capacity, saved = 0, cache.store
        cache.store = {}
        t_off, l_off, g_off = step(row)
        cache.store = saved
        if l_on != l_off or any((x is None) != (y is None) or x is not None and not torch.equal(x, y)
                                for x, y in zip(g_on, g_off)):
            sys.exit(f"cache on and off differ: loss {l_on} vs {l_off}")
        on.append(t_on)
        off.append(t_off)
    m_on, m_off = statistics.median(on) * 1000, statistics.median(off) * 1000
    print(f"{a.recipe}: {len(rows)} packed rows, forward + backward, median ms per row "
          f"({torch.get_num_threads()} threads); losses and gradients equal in both arms")
    print()
    print("| vision path | ms per row | ratio |")
    print("|---|---|---|")
    print(f"| tower on every use | {m_off:.1f} | 1.00 |")
    print(f"| features kept (FrozenImageCache) | {m_on:.1f} | {m_off / m_on:.2f}x faster |")
    print(f"\ncache: {len(cache.store)} images kept, {cache.hits} hits, {cache.misses} misses")


if __name__ == "__main__":
    main()
