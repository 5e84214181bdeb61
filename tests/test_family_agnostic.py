"""Nothing outside finetune/families/ names a family, a model class or a model-specific tensor key:
the rest of the package is written once against the Family contract (DESIGN.md). Code only:
comments and docstrings may give examples."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from finetune.families import _registry

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
#: the one place a family is named on purpose: the recipe's default model is the CPU demo's tiny model
ALLOWED = {("fields.py", '"tiny:qwen2_5_omni"')}


def family_words() -> set[str]:
    """Family names, their config model types, their transformers classes and their media keys."""
    words: set[str] = set()
    for name, cls in _registry().items():
        words.add(name)
        words.update(t for t in cls.model_types if len(t) > 4)  # Baichuan's "omni" is too generic a word
        words.update(v for v in vars(cls).values() if isinstance(v, str) and re.fullmatch(r"[A-Z]\w+For\w+", v))
        words.update(cls.media_keys.values())
        words.update(cls.float_media)
    words.update({"image_grid_thw", "video_grid_thw", "feature_attention_mask", "audio_feature_lengths",
                  "video_second_per_grid"})
    return words


def code_tokens(path: Path):
    """(token text) of names and string literals that are not docstrings; comments dropped."""
    toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    prev = tokenize.NEWLINE
    for tok in toks:
        if tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            prev = tok.type  # a docstring (an expression statement of its own)
            continue
        if tok.type in (tokenize.NAME, tokenize.STRING):
            yield tok.string, tok.start[0]
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type


def test_no_module_outside_families_names_a_family_or_its_tensors():
    words = family_words()
    assert {"qwen2_5_omni", "baichuan_omni", "qwen3_omni_moe", "pixel_values", "input_features"} <= words
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True))
                         + r")(?![A-Za-z0-9_])")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "families" in path.relative_to(PACKAGE).parts:
            continue
        for text, line in code_tokens(path):
            if pattern.search(text) and (path.name, text) not in ALLOWED:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text}")
    assert found == [], "model-specific names outside finetune/families/:\n" + "\n".join(found)


def test_the_check_finds_a_family_name_in_code(tmp_path):
    """The scan is not vacuous: a string or name in code is found, the same words in a comment or a
    docstring are not."""
    p = tmp_path / "m.py"
    p.write_text('"""Uses pixel_values of qwen2_5_omni."""\n# qwen2_5_omni here\nx = batch["pixel_values"]\n'
                 'def f():\n    """qwen3_omni_moe in a docstring."""\n    return qwen3_omni_moe\n')
    tokens = [t for t, _ in code_tokens(p)]
    assert tokens == ["x", "batch", '"pixel_values"', "def", "f", "return", "qwen3_omni_moe"]
