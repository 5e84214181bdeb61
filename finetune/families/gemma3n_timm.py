"""timm for Gemma 3n's vision tower (MobileNetV5) without torchvision.

Gemma 3n's vision tower is timm's `mobilenetv5_300m_enc`, built by transformers' TimmWrapper.
timm imports torchvision at module level (`timm.layers` needs `torchvision.ops.misc.
FrozenBatchNorm2d`, `timm.data` its transforms and datasets), and transformers only enables timm
when `find_spec("torchvision")` succeeds. The PyPI torchvision wheel is a CUDA build that does not
import beside a CPU torch, and MobileNetV5 never calls torchvision when it runs, so `ensure_timm()`
installs, only where no torchvision is installed, an import-only stand-in:

- a `sys.meta_path` finder serving `torchvision` and its submodules: any attribute is an inert
  placeholder class that raises when instantiated (so a code path that really needs torchvision
  fails loudly instead of computing something wrong); `torchvision.ops.misc.FrozenBatchNorm2d`
  is a small real module (timm subclasses and may construct it); `torchvision.models.
  feature_extraction` raises ImportError, which timm catches (no FX feature extraction);
- the lru-caches of transformers' `is_torchvision_available` / `is_timm_available` are cleared so
  that transformers sees timm, and the transformers modules that import timm conditionally and
  were imported before (without it) get the names they would have imported.

A real torchvision is never shadowed: with one installed, `ensure_timm()` only imports timm.
Because transformers then believes torchvision exists, the family never lets transformers pick a
torchvision image-processor backend: images go through `SiglipImageProcessorPil` (PIL).

The module also registers the tiny test encoder `mobilenetv5_tiny_enc` with timm (the same
MobileNetV5Encoder class, a few narrow blocks), which tiny checkpoints name as their architecture.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from finetune.errors import MissingExtraError

__all__ = ["ensure_timm", "stand_in_installed", "transformers_class", "TINY_ARCH", "TINY_BLOCKS"]

_ROOT = "torchvision"
_installed = False
_ready = False

#: the tiny encoder's blocks (timm's MobileNet block strings): four stride-2 stages, the last two
#: with a multi-query attention block; each stage ends in a conv block (the MSFA reads them).
#: Widths 24 (stem), 32, 48, 96, 96: a frozen random tower's features are what the tiny demo's LLM
#: learns to read, and at 8, 16, 16, 32, 32 they were too poor for it (an attention-pooled probe
#: for "lesion?" on held-out demo scans at 128 px: 0.68-0.93 over 7 init seeds, 0.90-0.95 at
#: these widths)
TINY_BLOCKS = [
    ["er_r1_k3_s2_e4_c32"],
    ["uir_r1_a3_k5_s2_e4_c48"],
    ["uir_r1_a5_k5_s2_e4_c96", "mqa_r1_k3_h2_v2_s1_d16_c96", "uir_r1_a0_k0_s1_e2_c96"],
    ["uir_r1_a5_k5_s2_e4_c96", "mqa_r1_k3_h2_s1_d16_c96", "uir_r1_a0_k0_s1_e2_c96"],
]
TINY_STEM = 24
TINY_ARCH = "mobilenetv5_tiny_enc"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__qualname__} needs torchvision, which is not installed (an import-only "
                           "stand-in serves timm's imports for Gemma 3n's vision tower)")


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (_Placeholder,), {"__qualname__": qualname})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and `torchvision.*` as stand-in modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _ROOT or fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__file__ = None
        if spec.name == _ROOT:
            module.__version__ = "0.0.0+stand-in"
        return module

    def exec_module(self, module):
        if module.__name__ == _ROOT + ".ops.misc":
            module.FrozenBatchNorm2d = _frozen_batch_norm()
        elif module.__name__ == _ROOT + ".models.feature_extraction":
            raise ImportError("torchvision stand-in: no FX feature extraction")


def _frozen_batch_norm():
    import torch

    class FrozenBatchNorm2d(torch.nn.Module):
        """Batch norm with fixed statistics and affine parameters (buffers, never trained)."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            self.eps = eps
            for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                               ("running_var", torch.ones)):
                self.register_buffer(name, init(num_features))

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    return FrozenBatchNorm2d


def stand_in_installed() -> bool:
    """Whether this process runs timm on the stand-in (no real torchvision installed)."""
    return _installed


def transformers_class(name: str):
    """A transformers class by name, with timm made importable first (Gemma 3n's vision tower needs it)."""
    ensure_timm()
    import transformers

    return getattr(transformers, name)


def ensure_timm() -> None:
    """Make timm importable and visible to transformers, and register the tiny encoder (idempotent)."""
    global _installed, _ready
    if _ready:
        return
    if importlib.util.find_spec("timm") is None:
        raise MissingExtraError("Gemma 3n's vision tower needs timm: pip install -e '.[gemma3n]' "
                                "(then `pip install --no-deps timm` where torchvision is not wanted: see the Makefile)")
    if _ROOT not in sys.modules and importlib.util.find_spec(_ROOT) is None:
        sys.meta_path.insert(0, _Finder())
        _installed = True
    import timm  # noqa: F401  (fails here, not inside transformers, if something is still missing)
    import timm.data

    _refresh_transformers(timm)
    _register_tiny()
    _ready = True


def _refresh_transformers(timm) -> None:
    """transformers decides once whether timm is usable (lru-cached checks, module-level imports)."""
    from transformers.utils import import_utils

    for name in ("is_torchvision_available", "is_torchvision_v2_available", "is_timm_available"):
        fn = getattr(import_utils, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    if not import_utils.is_timm_available():
        raise MissingExtraError("transformers does not see timm even with the torchvision stand-in; "
                                "install timm (pip install -e '.[gemma3n]')")
    # modules that ran `if is_timm_available(): import ...` before timm was visible
    names = {"transformers.models.timm_wrapper.modeling_timm_wrapper": {"timm": timm},
             "transformers.models.timm_wrapper.configuration_timm_wrapper": None,
             "transformers.models.gemma3n.configuration_gemma3n": None}
    for mod_name, extra in names.items():
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        values = extra or {"ImageNetInfo": timm.data.ImageNetInfo,
                           "infer_imagenet_subset": timm.data.infer_imagenet_subset}
        for k, v in values.items():
            if not hasattr(mod, k):
                setattr(mod, k, v)


def _register_tiny() -> None:
    from timm.models import is_model, register_model

    if is_model(TINY_ARCH):
        return
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv5 import _create_mnv5_encoder

    def mobilenetv5_tiny_enc(pretrained: bool = False, **kwargs):
        """MobileNetV5Encoder with a few narrow blocks (tests and the CPU demo). The block
        arguments are decoded on every call: timm's builder changes them in place, so they
        cannot travel in the (JSON) config's model_args."""
        kwargs.setdefault("pad_type", "same")
        kwargs.setdefault("stem_size", TINY_STEM)
        # no layer scale: the released 1e-5 start keeps a random tower's blocks near identity,
        # which a tiny model trained from scratch on the CPU cannot afford
        return _create_mnv5_encoder("mobilenetv5_300m_enc", pretrained, block_args=decode_arch_def(TINY_BLOCKS),
                                    layer_scale_init_value=None, **kwargs)

    mobilenetv5_tiny_enc.__module__ = __name__
    register_model(mobilenetv5_tiny_enc)
