"""A fake CUDA device for machines without a GPU (issue 24): device and dtype mismatches surface.

Tensors on the fake `cuda:0` are `cuda` to every check that decides a code path: Python's
`.device` / `.is_cuda`, the dispatcher's CUDA keys (so CUDA autocast casts them by its own
rules), the autograd engine's device streams, `torch.accelerator`, pinned memory. Their values
live in host memory and every kernel runs on the CPU, on real values, so a whole training step,
generation and evaluation run. What a GPU refuses is refused here:

- a host tensor (not a 0-dim scalar) meeting a cuda tensor in an op: "Expected all tensors to be
  on the same device" (copies, and the index tensors of an indexing op, may cross as on CUDA);
- reading a cuda tensor as numpy without a copy to the host;
- PyTorch's varlen flash op (`torch.nn.attention.varlen`) on float32, below compute capability
  8.0 (`run(..., capability=(7, 5))`), or with non-int32 boundaries; the op itself is answered
  by a host implementation of what the kernel computes (forward and backward).

CUDA-only kernels the libraries call are computed on the host: matmuls with a float32 `out_dtype`
(TRL's chunked head), `histc` of integers (transformers' MoE routing). Scaled dot-product
attention takes its math path.

`Record` counts what ran on the device: host reads (`.item()`, `.tolist()`, `nonzero`, copies to
the host), host-to-device copies (pinned or not, non_blocking or not), every op, the dtypes
matmuls ran in, varlen flash calls; FAKE_CUDA_TRACE=name,... keeps where they ran. A test
asserts from it that a CUDA branch was really taken.

How: a small C++ library registers what a CUDA build of PyTorch registers, a device guard and
CUDA hooks, as no-ops (its pinned allocator is host memory that it remembers). PyTorch looks the
hooks up once, when it is imported, so the library is preloaded (LD_PRELOAD) into a process of
its own: `run(...)` starts it, calls a function there and returns what it returned with the
record. There a TorchDispatchMode runs every op: a cuda tensor is an alias of a host tensor
(`elem`) that carries CUDA's dispatch keys, and each op runs on the aliased host tensors.

What it cannot fake: CUDA kernels themselves (Triton: TRL's chunked head and others find no
Triton and take their torch path; flash-attn builds; cuDNN), bitsandbytes' 4-bit parameters on
CUDA (Params4bit is itself a tensor subclass, so QLoRA and `export.quantize` do not load on the
fake device), streams and real asynchrony (a non_blocking copy completes at once), timing,
memory limits, NCCL.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SOURCE = r"""
// The registrations a CUDA build of PyTorch makes, as no-ops over host memory (tests/fake_cuda.py).
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Registry.h>

#include <mutex>
#include <unordered_set>

namespace fake_cuda {
using namespace c10;

struct Guard final : public impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device d) const noexcept override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const noexcept override { return Stream(Stream::DEFAULT, s.device()); }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const Stream&, const DeviceIndex, const EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void synchronizeDevice(const DeviceIndex) const override {}
};

// "pinned" host memory: ordinary host memory whose addresses are remembered, so that is_pinned
// answers as on a GPU machine (in any thread: the DataLoader pins in a thread of its own)
std::mutex pinned_mutex;
std::unordered_set<void*>& pinned() { static std::unordered_set<void*> s; return s; }

void free_pinned(void* p) {
  { std::lock_guard<std::mutex> lock(pinned_mutex); pinned().erase(p); }
  free_cpu(p);
}

struct PinnedAllocator final : public Allocator {
  DataPtr allocate(size_t n) override {
    void* p = n ? alloc_cpu(n) : nullptr;
    if (p) { std::lock_guard<std::mutex> lock(pinned_mutex); pinned().insert(p); }
    return {p, p, &free_pinned, Device(DeviceType::CPU)};
  }
  DeleterFnPtr raw_deleter() const override { return &free_pinned; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

PinnedAllocator pinned_allocator;

struct Hooks final : public at::CUDAHooksInterface {
  Hooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  void init() const override {}
  DeviceIndex deviceCount() const override { return 1; }
  int getNumGPUs() const override { return 1; }
  DeviceIndex current_device() const override { return 0; }
  DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(DeviceIndex) const override {}
  DeviceIndex exchangeDevice(DeviceIndex) const override { return 0; }
  DeviceIndex maybeExchangeDevice(DeviceIndex) const override { return 0; }
  bool isPinnedPtr(const void* p) const override {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    return pinned().count(const_cast<void*>(p)) > 0;
  }
  Allocator* getPinnedMemoryAllocator() const override { return &pinned_allocator; }
  Device getDeviceFromPtr(void*) const override { return Device(DeviceType::CUDA, 0); }
  void deviceSynchronize(DeviceIndex) const override {}
};

C10_REGISTER_GUARD_IMPL(CUDA, Guard);
}  // namespace fake_cuda

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", fake_cuda::Hooks);
}
"""


class FakeCudaUnavailable(RuntimeError):
    """The library cannot be built here (no C++ compiler, no PyTorch headers)."""


def build(cache: Path | None = None) -> Path:
    """Compile the guard and hooks library once (cached by its source and the torch build).
    Raises FakeCudaUnavailable when it cannot be built here."""
    import torch

    torch_dir = Path(torch.__file__).parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise FakeCudaUnavailable("no C++ compiler (g++ or c++) on PATH")
    if not (torch_dir / "include" / "ATen" / "detail" / "CUDAHooksInterface.h").exists():
        raise FakeCudaUnavailable(f"no PyTorch C++ headers under {torch_dir / 'include'}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(f"{SOURCE}{torch.__version__}{torch_dir}{abi}{cxx}".encode()).hexdigest()[:16]
    cache = Path(cache or os.environ.get("OMNI_FINETUNE_CACHE", ROOT / ".cache")) / "fake_cuda"
    lib = cache / f"fake_cuda_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"fake_cuda_{key}.cpp"
    src.write_text(SOURCE)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-shared", "-fPIC", "-O1", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
           f"-I{torch_dir / 'include'}", str(src), f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}",
           "-lc10", "-ltorch_cpu", "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FakeCudaUnavailable(f"building the fake CUDA library failed: {res.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


def run(target: str, *args, lib: Path, timeout: float = 600, capability: tuple[int, int] = (9, 0),
        env: dict | None = None) -> dict:
    """Call `module:function(*args)` (JSON arguments) in a process with the fake CUDA device.
    Returns {"result": what it returned, "error": None or {"type", "message", "traceback"},
    "record": Record.as_dict()}."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fake-cuda-") as tmp:
        out = Path(tmp) / "out.json"
        penv = {**os.environ, "LD_PRELOAD": str(lib), "FAKE_CUDA_LIB": str(lib),
                "FAKE_CUDA_CAPABILITY": f"{capability[0]}.{capability[1]}",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": "1", **(env or {})}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            penv.pop(k, None)
        cmd = [sys.executable, str(Path(__file__).resolve()), target, str(out), json.dumps(list(args))]
        res = subprocess.run(cmd, cwd=ROOT, env=penv, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"the fake CUDA process ended without a result (exit {res.returncode}):\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
        got = json.loads(out.read_text())
        got["stdout"], got["stderr"] = res.stdout, res.stderr
        return got


# ---- inside the process with the fake device -------------------------------------------------
class Record:
    """What ran on the fake device (counts)."""

    def __init__(self):
        self.ops = collections.Counter()  # aten op -> calls with a cuda tensor or onto cuda
        self.host_reads = collections.Counter()  # op that read a cuda tensor's values on the host
        self.h2d = collections.Counter()  # "pinned non_blocking", "pinned blocking", "pageable ..."
        self.matmul_dtypes = collections.Counter()  # dtype of mm / bmm / addmm / linear on cuda
        self.varlen = collections.Counter()  # "forward <dtype>", "backward <dtype>"
        self.events = collections.Counter()  # harness-level: scenario marks
        self.where: dict[str, list] = {}  # FAKE_CUDA_TRACE=op,op: the Python frames of their first calls

    def trace(self, name: str) -> None:
        """Keep where `name` ran (its first 10 calls) when it is in TRACE (FAKE_CUDA_TRACE=name,name)."""
        if name in TRACE and len(self.where.setdefault(name, [])) < 10:
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-3]
                      if not f.filename.endswith(("fake_cuda.py", "_ops.py", "eval_frame.py", "_compile.py"))]
            self.where[name].append(frames[-8:])

    COUNTS = ("ops", "host_reads", "h2d", "matmul_dtypes", "varlen", "events")

    def as_dict(self) -> dict:
        return {k: dict(getattr(self, k)) for k in self.COUNTS} | {"where": self.where}

    def since(self, before: dict) -> dict:
        """The counts added since `before` (an as_dict() taken earlier)."""
        now = self.as_dict()
        return {k: {n: c - before[k].get(n, 0) for n, c in now[k].items() if c != before[k].get(n, 0)}
                for k in self.COUNTS}


TRACE = set(filter(None, os.environ.get("FAKE_CUDA_TRACE", "").split(",")))
RECORD = Record()
CAPABILITY = (9, 0)


def _capability() -> tuple[int, int]:
    major, minor = os.environ.get("FAKE_CUDA_CAPABILITY", "9.0").split(".")
    return int(major), int(minor)


def activate():
    """Install the fake device in this process (the library must be preloaded): torch.cuda's
    Python API answers for one device, torch.tensor can build on it, and the dispatch mode runs
    every op. Returns RECORD."""
    global CAPABILITY
    import torch

    if getattr(torch.accelerator.current_accelerator(), "type", None) != "cuda":
        raise RuntimeError("the fake CUDA hooks are not installed: the library must be preloaded (fake_cuda.run)")
    CAPABILITY = _capability()
    try:  # bitsandbytes picks its backend at import: its CPU kernels, the ones that run on the wrapped data
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    os.environ.pop("LD_PRELOAD", None)  # this process's children (compilers, data workers' exec) go without it
    _patch_torch_cuda(torch)
    mode = _mode_class(torch)()
    mode.__enter__()  # for the life of this process
    return RECORD


def _patch_torch_cuda(torch) -> None:
    import types

    cap = CAPABILITY
    props = types.SimpleNamespace(name="fake CUDA device (host memory)", major=cap[0], minor=cap[1],
                                  total_memory=80 * 2 ** 30, multi_processor_count=132, is_integrated=False,
                                  is_multi_gpu_board=False, gcnArchName="", uuid="fake", L2_cache_size=50 * 2 ** 20,
                                  warp_size=32, max_threads_per_multi_processor=2048)
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.set_device = lambda device: None
    c._lazy_init = lambda: None
    c.init = lambda: None
    c.is_initialized = lambda: False  # torch.cuda.manual_seed & co. stay queued (the CPU generator serves)
    c.get_device_capability = lambda device=None: cap
    c.get_device_properties = lambda device=None: props
    c.get_device_name = lambda device=None: props.name
    # what torch.cuda answers on such a GPU: native bf16 from compute capability 8.0, emulated below
    c.is_bf16_supported = lambda including_emulation=True: cap >= (8, 0) or including_emulation
    c.get_arch_list = lambda: []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated",
                 "reset_accumulated_memory_stats", "ipc_collect", "manual_seed", "manual_seed_all", "seed",
                 "seed_all", "set_rng_state", "set_rng_state_all"):
        setattr(c, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(c, name, lambda *a, **k: 0)
    c.mem_get_info = lambda device=None: (props.total_memory, props.total_memory)
    c.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    c.get_rng_state_all = lambda: [torch.zeros(16, dtype=torch.uint8)]
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "manual_seed",
                 "manual_seed_all", "seed", "seed_all"):
        setattr(c.random, name, getattr(c, name))

    # torch.tensor & co. build their data with the dispatch modes switched off: build on the host, then copy
    def on_cuda(device) -> bool:
        return device is not None and (isinstance(device, int) or torch.device(device).type == "cuda")

    # `with torch.device(...)` fills in the device of the constructors it knows (the real ones; its
    # set is computed once): computed before they are replaced, and the context's cuda handled below
    import torch.utils._device

    torch.utils._device._device_constructors()
    real_tensor, real_as_tensor, real_new_tensor = torch.tensor, torch.as_tensor, torch.Tensor.new_tensor

    from torch.overrides import _get_current_function_mode_stack

    def context_cuda(device):
        """The device of a `with torch.device(...)` block or set_default_device, when it is cuda."""
        if device is not None:
            return device
        modes = [m for m in _get_current_function_mode_stack() if isinstance(m, torch.utils._device.DeviceContext)]
        ctx = modes[-1] if modes else getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
        return ctx.device if ctx is not None and torch.device(ctx.device).type == "cuda" else None

    def host_values(data):
        """Sequences holding cuda tensors: their values (torch.tensor reads them on the host, a sync each)."""
        if isinstance(data, (list, tuple)):
            return type(data)(host_values(x) for x in data)
        if isinstance(data, torch.Tensor) and data.device.type == "cuda":
            return data.tolist()
        return data

    def tensor(data, *args, device=None, requires_grad=False, pin_memory=False, **kwargs):
        if isinstance(data, (list, tuple)):
            data = host_values(data)
        device = context_cuda(device)
        if on_cuda(device):
            t = real_tensor(data, *args, device="cpu", **kwargs).to(device)
            return t.requires_grad_() if requires_grad else t
        return real_tensor(data, *args, device=device, requires_grad=requires_grad, pin_memory=pin_memory, **kwargs)

    def as_tensor(data, dtype=None, device=None):
        device = context_cuda(device)
        if on_cuda(device):
            if isinstance(data, torch.Tensor):
                return data.to(device=device, dtype=dtype)
            return real_as_tensor(data, dtype=dtype, device="cpu").to(device)
        return real_as_tensor(data, dtype=dtype, device=device)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        device = self.device if device is None else device
        if on_cuda(device):
            t = real_tensor(data, dtype=dtype or self.dtype, device="cpu").to(device)
            return t.requires_grad_() if requires_grad else t
        return real_new_tensor(self, data, dtype=dtype, device=device, requires_grad=requires_grad)

    torch.tensor, torch.as_tensor, torch.Tensor.new_tensor = tensor, as_tensor, new_tensor


def _mode_class(torch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map_only

    aten = torch.ops.aten
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    copies = {aten.copy_.default, aten._to_copy.default, aten.copy.default, aten._copy_from.default,
              aten._copy_from_and_resize.default, aten._foreach_copy_.default, aten.lift_fresh.default}
    indexing = {aten.index.Tensor: 1, aten.index_put.default: 1, aten.index_put_.default: 1,
                aten._index_put_impl_.default: 1, aten._unsafe_index.Tensor: 1}  # argument position of the indices
    matmuls = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.linear.default,
               aten._scaled_dot_product_attention_math.default}
    host_reads = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
                  aten.is_nonzero.default, aten._assert_async.default, aten.masked_select.default}

    class FakeCudaTensor(torch.Tensor):
        """A tensor on the fake cuda:0; its values are those of `elem`, a host tensor it aliases."""

        @staticmethod
        def __new__(cls, elem):
            # an alias of elem (same host storage: storage pointers identify shared weights as on a
            # GPU) whose dispatch keys are CUDA's and whose device the dispatcher asks us for
            out = torch.Tensor._make_subclass(cls, elem, False, dispatch_device=True, device_for_backend_keys=cuda)
            out.elem = elem
            return out

        __torch_function__ = torch._C._disabled_torch_function_impl

        def __format__(self, spec):  # Tensor.__format__ reads 0-dim values only for exact Tensors
            return self.elem.__format__(spec) if self.dim() == 0 else object.__format__(self, spec)

        def __deepcopy__(self, memo):  # Tensor's copies the storage, then set_()s a new tensor's metadata
            if id(self) not in memo:
                with torch.no_grad():
                    new = FakeCudaTensor(self.elem.clone()).requires_grad_(self.requires_grad)
                for k, v in self.__dict__.items():
                    if k != "elem":
                        setattr(new, k, copy.deepcopy(v, memo))
                memo[id(self)] = new
            return memo[id(self)]

        def __reduce_ex__(self, protocol):  # torch.save / pickle: the values, as a host tensor
            return self.elem.detach().__reduce_ex__(protocol)

        def numpy(self, *, force=False):  # as on a GPU: only through a copy to the host
            if force:
                return self.cpu().numpy()
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")

        def tolist(self):  # PyTorch refuses tolist() on subclasses; on a GPU it is a copy to the host
            RECORD.host_reads["tolist"] += 1
            RECORD.trace("host read")
            return self.elem.tolist()

        # a "traceable" wrapper: Module.to() then swaps each parameter in place (torch.utils.swap_tensors)
        # instead of assigning `.data` across tensor types, so tied and referenced parameters stay one object
        def __tensor_flatten__(self):
            return ["elem"], None

        @staticmethod
        def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
            return FakeCudaTensor(inner["elem"])

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            return handle(func, args, kwargs or {})  # within our own handler (the mode is off there)

    def is_host(t) -> bool:
        return isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.device.type == "cpu"

    def check_devices(func, args, kwargs):
        if func in copies:
            return
        skip = indexing.get(func)
        leaves = tree_leaves([a for i, a in enumerate(args) if i != skip]) + tree_leaves(kwargs)
        host = [t for t in leaves if is_host(t) and t.dim() > 0]
        if host:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (fake CUDA: {func}, host tensor of shape {tuple(host[0].shape)})")

    def unwrap(x):
        return tree_map_only(FakeCudaTensor, lambda t: t.elem, x)

    def wrap(x):
        return tree_map_only(torch.Tensor, lambda t: t if isinstance(t, FakeCudaTensor) else FakeCudaTensor(t), x)

    def aliased_return(func, args, kwargs, out):
        """In-place and out= ops return their own (already wrapped) argument, as the dispatcher expects."""
        schema = func._schema
        writes = {}
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                val = kwargs.get(a.name) if a.kwarg_only or a.name in kwargs else (args[i] if i < len(args) else None)
                writes[frozenset(a.alias_info.before_set)] = val
        if not writes:
            return None
        rets = schema.returns
        if len(rets) == 1 and rets[0].alias_info is not None:
            return writes.get(frozenset(rets[0].alias_info.before_set))
        if len(rets) > 1 and all(r.alias_info is not None for r in rets):
            return tuple(writes.get(frozenset(r.alias_info.before_set)) for r in rets)
        if not rets:
            return out
        return None

    def varlen_forward(args, kwargs):
        q, k, v, cu_q, cu_k, max_q, max_k = args[:7]
        names = ["is_causal", "scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"]
        opts = dict(zip(names, args[7:])) | kwargs
        cu_k = cu_q if cu_k is None else cu_k
        flash_checks(q, k, v, cu_q, cu_k)
        RECORD.varlen[f"forward {str(q.dtype).replace('torch.', '')}"] += 1
        out, lse = _reference_varlen(torch, q.elem, k.elem, v.elem, cu_q.elem, cu_k.elem, opts.get("is_causal", False),
                                     opts.get("scale"), opts.get("window_size"))
        return FakeCudaTensor(out), FakeCudaTensor(lse), FakeCudaTensor(torch.zeros(2, dtype=torch.uint64))

    def varlen_backward(args, kwargs):
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, rng = args[:12]
        opts = dict(zip(["scale", "window_size"], args[12:])) | kwargs
        flash_checks(q, k, v, cu_q, cu_k)
        RECORD.varlen[f"backward {str(q.dtype).replace('torch.', '')}"] += 1
        grads = _reference_varlen(torch, q.elem, k.elem, v.elem, cu_q.elem, cu_k.elem, is_causal, opts.get("scale"),
                                  opts.get("window_size"), grad_out=grad_out.elem)
        return tuple(FakeCudaTensor(g) for g in grads)

    def flash_checks(q, k, v, cu_q, cu_k):
        """What PyTorch's flash kernels refuse on a GPU."""
        for t in (q, k, v, cu_q, cu_k):
            if not isinstance(t, FakeCudaTensor):
                raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                                   "cuda:0 and cpu! (fake CUDA: torch_attn varlen flash attention)")
        if CAPABILITY < (8, 0):
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise RuntimeError("query and key must have the same dtype")
        if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
            raise RuntimeError("cu_seqlens_q must have dtype int32")
        if q.shape[-1] > 256:
            raise RuntimeError("FlashAttention forward only supports head dimension at most 256")

    def handle(func, args, kwargs):
        if func.namespace == "torch_attn" and func._opname == "_varlen_attn":
            return varlen_forward(args, kwargs)
        if func.namespace == "torch_attn" and func._opname == "_varlen_attn_backward":
            return varlen_backward(args, kwargs)
        if func is torch.ops.prim.device.default:
            return cuda
        if func is aten._fused_sdp_choice.default:
            # the C++ SDPA would pick a CUDA kernel for cuda inputs: its math path runs anywhere
            RECORD.ops[str(func)] += 1
            return 0  # SDPBackend.MATH
        leaves = tree_leaves((args, kwargs))
        on_device = any(isinstance(t, FakeCudaTensor) for t in leaves)
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type == "cuda"
        if not (on_device or to_device):
            return func(*args, **kwargs)
        name = str(func)
        RECORD.ops[name] += 1
        RECORD.trace(name)
        if on_device:
            check_devices(func, args, kwargs)
        if func in host_reads or (func is aten._to_copy.default and on_device and device is not None
                                  and torch.device(device).type == "cpu"):
            RECORD.host_reads[name] += 1
            RECORD.trace("host read")
        if func in matmuls and on_device:
            RECORD.matmul_dtypes[str(args[0].dtype).replace("torch.", "")] += 1
        if to_device and func is aten._to_copy.default and is_host(args[0]):
            pinned = args[0].is_pinned()
            kind = f"{'pinned' if pinned else 'pageable'} " + ("non_blocking" if kwargs.get("non_blocking") else "blocking")
            RECORD.h2d[kind] += 1
            RECORD.trace(f"h2d {kind}")
        if func is aten.copy_.default and isinstance(args[0], FakeCudaTensor) and is_host(args[1]):
            RECORD.h2d[f"{'pinned' if args[1].is_pinned() else 'pageable'} copy_ "
                       f"{'non_blocking' if (args[2:] and args[2]) or kwargs.get('non_blocking') else 'blocking'}"] += 1
        uargs, ukwargs = unwrap(args), unwrap(kwargs)
        if func._opname in ("mm", "bmm", "addmm", "baddbmm") and func._overloadname in ("dtype", "dtype_out"):
            # 16-bit matmuls into a float32 result (CUDA only): the same, from float32 copies
            n = 2 if func._opname in ("mm", "bmm") else 3
            out_dtype = uargs[n]
            res = getattr(aten, func._opname).default(*(t.to(out_dtype) for t in uargs[:n]),
                                                      **{k: v for k, v in ukwargs.items() if k in ("beta", "alpha")})
            if func._overloadname == "dtype":
                return wrap(res)
            ukwargs["out"].copy_(res)
            return kwargs["out"]
        if func is aten.histc.default and not uargs[0].is_floating_point():
            # CUDA's histc takes integer input (transformers' MoE counts tokens per expert so); the CPU's does not
            return wrap(func(uargs[0].float(), *uargs[1:], **ukwargs).to(uargs[0].dtype))
        if to_device:
            ukwargs = {**ukwargs, "device": cpu}
        if ukwargs.get("pin_memory"):
            ukwargs["pin_memory"] = False
        out = func(*uargs, **ukwargs)
        same = aliased_return(func, args, kwargs, out)
        if same is not None:
            for t in tree_leaves(same):
                if isinstance(t, FakeCudaTensor) and (t.shape, t.stride(), t.storage_offset()) != \
                        (t.elem.shape, t.elem.stride(), t.elem.storage_offset()):
                    raise NotImplementedError(f"fake CUDA: {func} changes a tensor's shape in place (not emulated)")
            return same
        if device is not None and not to_device:
            return out  # explicitly to the host
        return wrap(out)

    class FakeCudaMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return handle(func, args, kwargs or {})

    global FakeCudaTensorType
    FakeCudaTensorType = FakeCudaTensor
    return FakeCudaMode


FakeCudaTensorType = None


def _reference_varlen(torch, q, k, v, cu_q, cu_k, is_causal, scale, window, grad_out=None):
    """What the flash kernel computes, per segment in float32 on the host: (out, lse), or
    (dq, dk, dv) given grad_out (written out: autograd does not record inside a dispatch mode).
    window (left, right): -1 = unbounded; causal aligns the last query with the last key, as flash does."""
    left, right = (list(window) if window is not None else [-1, -1])
    if is_causal:
        right = 0
    H, Hk, D = q.shape[1], k.shape[1], q.shape[2]
    rep = H // Hk
    scale = D ** -0.5 if scale is None else scale
    bq, bk = cu_q.tolist(), cu_k.tolist()
    qf, kf, vf = (t.float() for t in (q, k, v))
    out, lse = torch.zeros_like(qf), torch.zeros(H, q.shape[0])
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for (s, e), (ks, ke) in zip(zip(bq[:-1], bq[1:]), zip(bk[:-1], bk[1:])):
        n, m = e - s, ke - ks
        qs = qf[s:e].transpose(0, 1)  # [H, n, D]
        kk = kf[ks:ke].transpose(0, 1).repeat_interleave(rep, 0)  # [H, m, D]
        vv = vf[ks:ke].transpose(0, 1).repeat_interleave(rep, 0)
        i = torch.arange(n)[:, None] + (m - n)
        j = torch.arange(m)[None, :]
        keep = torch.ones(n, m, dtype=torch.bool)
        if right >= 0:
            keep &= j <= i + right
        if left >= 0:
            keep &= j >= i - left
        scores = (qs @ kk.transpose(1, 2) * scale).masked_fill(~keep, float("-inf"))
        p = scores.softmax(-1).nan_to_num(0.0)
        o = p @ vv  # [H, n, D]
        out[s:e] = o.transpose(0, 1)
        lse[:, s:e] = torch.logsumexp(scores, -1)
        if grad_out is not None:
            do = grad_out[s:e].float().transpose(0, 1)
            dvv = p.transpose(1, 2) @ do
            dp = do @ vv.transpose(1, 2)
            ds = p * (dp - (do * o).sum(-1, keepdim=True))
            dq[s:e] = (ds @ kk * scale).transpose(0, 1)
            dk[ks:ke] = (ds.transpose(1, 2) @ qs * scale).view(Hk, rep, m, D).sum(1).transpose(0, 1)
            dv[ks:ke] = dvv.view(Hk, rep, m, D).sum(1).transpose(0, 1)
    if grad_out is None:
        return out.to(q.dtype), lse
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _short_traceback() -> str:
    """The Python frames (a dispatcher error lists every backend after its first line)."""
    lines = traceback.format_exc().splitlines()
    return "\n".join(ln if len(ln) < 400 else ln[:400] + " ..." for ln in lines if "registered at" not in ln)[-8000:]


def _main(argv: list[str]) -> int:
    target, out_path, args = argv[0], Path(argv[1]), json.loads(argv[2])
    result, error = None, None
    try:
        activate()
        module, _, func = target.partition(":")
        import importlib

        result = getattr(importlib.import_module(module), func)(*args)
    except BaseException as e:  # the caller asserts on it
        error = {"type": type(e).__name__, "message": str(e), "traceback": _short_traceback()}
    out_path.write_text(json.dumps({"result": result, "error": error, "record": RECORD.as_dict()}, default=str))
    return 0


if __name__ == "__main__":
    import fake_cuda  # one module object: the scenario's `import fake_cuda` sees this RECORD

    sys.exit(fake_cuda._main(sys.argv[1:]))
