"""Stand-in for `deepspeed` (our own code, for the Baichuan-Omni reference harness).

What the reference touches, and what this stub gives it:
- audio_modeling_omni.py: `import deepspeed` at module level and
  `deepspeed.zero.register_external_parameter(module, param)`, a ZeRO-3 bookkeeping hint with no
  effect on the maths -> a no-op here.
- sequence_parallel_utils.py: `import deepspeed.comm as dist` (inside try/except); `dist` is only
  used when sequence parallelism is on, which it never is here -> an empty `comm` module whose
  collective calls raise if ever reached.
- modeling_omni.RotaryEmbedding: `deepspeed.runtime.zero.partition_parameters._orig_torch_arange`,
  which is real DeepSpeed's saved copy of the un-patched `torch.arange` -> `torch.arange` itself.

No package metadata is installed, so transformers' `is_deepspeed_available()` stays False.
"""

from __future__ import annotations

import sys
import types

import torch

__version__ = "0.0.0+baichuan-ref-stub"


def _submodule(name: str, doc: str) -> types.ModuleType:
    mod = types.ModuleType(f"{__name__}.{name}", doc)
    sys.modules[mod.__name__] = mod
    return mod


# deepspeed.zero -------------------------------------------------------------------------------
zero = _submodule("zero", "stub of deepspeed.zero")


def _register_external_parameter(module, parameter):
    """No-op: ZeRO-3 partitioning hint only."""


class _GatheredParameters:
    """No-op context manager (parameters are never partitioned here)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


zero.register_external_parameter = _register_external_parameter
zero.GatheredParameters = _GatheredParameters

# deepspeed.comm -------------------------------------------------------------------------------
comm = _submodule("comm", "stub of deepspeed.comm (single process, no collectives)")


def _no_collectives(*args, **kwargs):
    raise RuntimeError("deepspeed stub: collective communication is not available")


comm.is_initialized = lambda: False
comm.get_world_size = lambda group=None: 1
comm.get_rank = lambda group=None: 0
comm.all_to_all_single = _no_collectives
comm.all_reduce = _no_collectives
comm.barrier = lambda *a, **k: None
comm.ProcessGroup = object

# deepspeed.runtime.zero.partition_parameters ------------------------------------------------
runtime = _submodule("runtime", "stub of deepspeed.runtime")
runtime_zero = _submodule("runtime.zero", "stub of deepspeed.runtime.zero")
partition_parameters = _submodule(
    "runtime.zero.partition_parameters", "stub of deepspeed.runtime.zero.partition_parameters"
)
partition_parameters._orig_torch_arange = torch.arange
runtime.zero = runtime_zero
runtime_zero.partition_parameters = partition_parameters
