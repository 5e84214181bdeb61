"""Generation as eval and export use it: a left-padded batch mixing audio, image, video and
text-only prompts, with the KV cache, must answer exactly what a cache-free greedy loop answers
for each prompt alone (media given with the whole sequence at every step), for both families.

Media belong to the prompt: whatever a transformers release hands the model again on later
decoding steps (5.24 forwards `audio_features` at every step and names the cache `cache`), the
answer must not change.
"""

from __future__ import annotations

import pytest
import torch

from media_samples import MIXES, greedy_without_cache, sample

from finetune.models import load_spec
from finetune.probes import generate

BATCH = ("audio", "image", "text", "video", "all")


@pytest.fixture(scope="module", params=["medical-tiny", "medical-baichuan-tiny"])
def tiny_model(request):
    from finetune.families import family_for
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    recipe = load_recipe(request.param, ["model.max_pixels=12544"])
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    loaded.model.eval()
    return fam, loaded



def test_batched_generation_with_cache_equals_cache_free_greedy(tiny_model, media_dir):
    fam, loaded = tiny_model
    proc, model = loaded.processor, loaded.model
    rope = fam.rope_index(model)
    samples = [sample(media_dir, MIXES[m]) for m in BATCH]
    n = 6
    got = generate(model, fam, proc, samples, rope, max_new_tokens=n, batch_size=len(samples))
    for mix, s, text in zip(BATCH, samples, got):
        ref = greedy_without_cache(model, fam, proc, s, rope, n)
        want = proc.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert text == want, (fam.name, mix)


def test_continued_prompt_with_new_media_uses_it(tiny_model, media_dir):
    """A cache that already holds a prompt, then new input carrying image placeholders: the
    new image's features must be used (decoding steps ignore media, continued prompts do not)."""
    fam, loaded = tiny_model
    proc, model = loaded.processor, loaded.model
    if fam.mrope:
        pytest.skip("Qwen2.5-Omni's continuation is transformers' own code")
    from transformers import DynamicCache

    first = fam.encode(sample(media_dir, MIXES["text"]), proc, for_generation=True)
    second = fam.encode(sample(media_dir, MIXES["image"]), proc, for_generation=True)
    whole = torch.cat([first.input_ids, second.input_ids])[None]
    with torch.no_grad():
        ref = model(input_ids=whole, use_cache=False, **second.media).logits[0, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=first.input_ids[None], past_key_values=cache, use_cache=True)
        pos = torch.arange(first.num_tokens, whole.shape[1])[None]
        got = model(input_ids=second.input_ids[None], past_key_values=cache, use_cache=True, position_ids=pos,
                    **second.media).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
