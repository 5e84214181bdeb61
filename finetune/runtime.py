"""The process the toolkit runs in (layer 1): its rank under torchrun, the device's precision,
dtypes by name, data-loader workers, and quiet libraries.

Nothing of the package is imported here but `finetune.errors`. `rank()`, `world_size()` and
`is_main_process()` read torchrun's environment, so they answer before torch.distributed is up.
"""

from __future__ import annotations

import logging
import os

import torch

from finetune.errors import ConfigError

#: every spelling of a dtype the recipes and the command line use -> the torch dtype (one map)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """A dtype by its recipe name (fp32, bf16, fp16, or float32, bfloat16, float16)."""
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


# ---- ranks ------------------------------------------------------------------------------------
def rank() -> int:
    """Global rank of this process under torchrun (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes of the job (1 when not launched distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on the one process that writes the run folder (global rank 0)."""
    return rank() == 0


# ---- the device ---------------------------------------------------------------------------------
def native_bf16() -> bool:
    """The GPU computes in bfloat16 natively: compute capability 8.0 or more (Ampere), or a ROCm
    device that says so. `torch.cuda.is_bf16_supported()` also counts emulation, which T4, RTX 20xx,
    TITAN RTX and V100 offer: slow bf16 and no flash kernels there."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability() >= (8, 0)


def choose_precision(setting: str) -> str:
    """auto -> bf16 where the GPU has it natively, fp16 (with a loss scaler) on older GPUs, fp32 on
    the CPU. An explicit bf16 on a GPU that only emulates it is refused before anything loads."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if native_bf16() else "fp16"
        return "fp32"
    if setting == "bf16" and torch.cuda.is_available() and not native_bf16():
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        raise ConfigError(f"train.precision=bf16: {name} (compute capability {cap[0]}.{cap[1]}) only emulates "
                          "bfloat16 (slow, and no flash attention); use train.precision=fp16 or auto")
    return setting


def data_workers(setting: int) -> int:
    """data.num_workers with -1 (auto) resolved: up to 4 on CUDA (decoding beside the GPU's work),
    0 on the CPU (the cores are busy training)."""
    if setting >= 0:
        return setting
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if torch.cuda.is_available() else 0


# ---- the console ------------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Keep the console readable: our own progress bar and tables, not every library's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


#: bitsandbytes logs this at import on CPUs with AVX-512 BF16 when the optional `kernels` package
#: cannot fetch its faster 4-bit CPU kernel; it matters only where 4-bit runs on the CPU
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL = "Failed to load CPU gemm_4bit_forward"
_bnb_notes: list[str] = []
_bnb_told = False


class _HoldBnbKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _BNB_KERNEL in record.getMessage():
            _bnb_notes.append(record.getMessage())
            return False
        return True


def hold_library_notices() -> None:
    """Install once, before bitsandbytes is imported: its CPU-kernel notice is held back."""
    log = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _HoldBnbKernelNotice) for f in log.filters):
        log.addFilter(_HoldBnbKernelNotice())


def tell_4bit_on_cpu() -> None:
    """Where 4-bit weights really run on the CPU: say once that the slower built-in path is used."""
    global _bnb_told
    if _bnb_notes and not _bnb_told:
        _bnb_told = True
        print("note: bitsandbytes 4-bit on the CPU runs its built-in kernels (the faster `kernels` one could not "
              "be loaded; `pip install kernels` and network access bring it). Training is slower, not different.",
              flush=True)
