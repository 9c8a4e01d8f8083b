"""Catch tensors on the wrong device on a CPU-only machine: a "logical CUDA device".

Why not FakeTensorMode with a fake "cuda" device: the training, validation, predict and
diagnose paths need real values (`.item()` at log steps, `bool(finite)` per step, PyAV
encodes frames from numpy, the data loader decodes real clips), which fake tensors do not
have. So this runs the real CPU math and tracks where each tensor *would* live:

- `device=cuda`/`cuda:N` everywhere behaves as on a one-GPU machine: `torch.cuda.is_available()`
  is True, `resolve_device("cuda")` succeeds, `torch.Generator("cuda")` is a (CPU) generator
  that says it is on cuda, and `tensor.device` / `.is_cuda` report the logical device.
- A tensor is logically on the GPU when its storage was made by `.to(cuda)`, `.cuda()`, a
  factory call with `device=cuda`, or an op with a GPU input (storages, not tensor objects, are
  marked, so views, `.data` swaps in `Module.to` and `Parameter`s follow). A parameter's
  `.grad` is on its parameter's device. `.cpu()`/`.to("cpu")` copy and unmark.
- Each torch call then applies CUDA's rules: all tensor arguments on one device (0-dim CPU
  tensors excepted, as CUDA allows them), a random op's generator on its output's device,
  indices of a CPU tensor on the CPU, no `.numpy()` of a GPU tensor; `copy_` and assignment
  may cross devices. A break raises `DeviceMismatch` at the offending call, whose traceback
  is the stack to the bug.

Not covered: DDP (gloo needs real CPU tensors on both sides: the 2-process tests run it on
CPU), torch.compile, and CUDA-only kernels. Use: `with logical_cuda(): main([... "device=cuda"])`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_T = torch.Tensor


class DeviceMismatch(RuntimeError):
    """A call that would fail (or silently run on the wrong device) on a real GPU."""


class LogicalGenerator(torch.Generator):
    """`torch.Generator(device)` whose `.device` is the logical device; it draws on the CPU."""

    def __new__(cls, device: Any = "cpu"):
        gen = super().__new__(cls, "cpu")
        gen.logical_device = _logical(torch.device(device))
        return gen

    def __init__(self, device: Any = "cpu"):
        pass  # the C base already initialised it in __new__

    @property
    def device(self) -> torch.device:
        return self.logical_device


def _logical(device: torch.device) -> torch.device:
    return CUDA if device.type == "cuda" else CPU


def _as_device(value: Any) -> torch.device:
    return torch.device(value) if not isinstance(value, int) else torch.device("cuda", value)


class LogicalDeviceMode(TorchFunctionMode):
    """The checker (see the module docstring). `calls` counts the torch calls it checked,
    `host_reads` the reads of a GPU tensor's value on the host (`.item()`, `bool()`,
    `.tolist()`, `.cpu()`, `torch.equal`, ...: `_HOST_READS`): the host syncs a CUDA run would make."""

    def __init__(self):
        super().__init__()
        self._gpu = {}  # storage address -> weak reference (keeps the address unique while alive)
        self.calls = 0
        self.host_reads = 0

    # ------------------------------------------------------------------ marks

    def device_of(self, t: torch.Tensor) -> torch.device:
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # no storage (e.g. meta): say cpu
            return CPU
        ref = self._gpu.get(key)
        if ref is None:
            return CPU
        if ref.expired():
            del self._gpu[key]
            return CPU
        return CUDA

    def _mark(self, out: Any, device: torch.device) -> Any:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if device.type == "cuda":
                    self._gpu[storage._cdata] = StorageWeakRef(storage)
                else:
                    self._gpu.pop(storage._cdata, None)
        return out

    def _prune(self) -> None:
        for key in [k for k, ref in self._gpu.items() if ref.expired()]:
            del self._gpu[key]

    # ------------------------------------------------------------------ dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.calls += 1
        if func in _HOST_READS and self.device_of(args[0]).type == "cuda":
            self.host_reads += 1  # the host waits for the GPU here
        if self.calls % 20000 == 0:
            self._prune()
        if type(func).__name__ == "method-wrapper":  # a property getter: t.device, t.grad, ...
            return self._getter(func, args)
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self, func, args, kwargs)
        if func in _UNCHECKED:
            return func(*args, **kwargs)
        return self._generic(func, args, kwargs)

    def _getter(self, func, args):
        name, t = func.__self__.__name__, args[0]
        if name == "device":
            return self.device_of(t)
        if name == "is_cuda":
            return self.device_of(t).type == "cuda"
        if name == "is_cpu":
            return self.device_of(t).type == "cpu"
        out = func(*args)
        if name == "grad" and out is not None:  # autograd made it outside the mode
            self._mark(out, self.device_of(t))
        return out

    def _generic(self, func, args, kwargs):
        target = None
        if kwargs.get("device") is not None:
            target = _logical(_as_device(kwargs["device"]))
            kwargs["device"] = "cpu"
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        devices = self._check_same_device(func, inputs)
        out = func(*args, **kwargs)
        if target is None:
            target = CUDA if CUDA in devices else CPU
        generator = kwargs.get("generator")
        if isinstance(generator, torch._C.Generator):
            self._check_generator(func, generator, target)
        if target.type == "cuda":
            self._mark(out, target)
        return out

    def _check_same_device(self, func, tensors: list) -> set:
        """CUDA's rule: one device per call; a 0-dim CPU tensor is a scalar and may join."""
        devices = {self.device_of(t) for t in tensors if not (t.ndim == 0 and self.device_of(t) == CPU)}
        if len(devices) > 1:
            desc = ", ".join(f"{tuple(t.shape)} on {self.device_of(t)}" for t in tensors)
            raise DeviceMismatch(f"{_name(func)} mixes devices: {desc}. On a GPU this is 'Expected all "
                                 "tensors to be on the same device'; move one side with .to(device)")
        return devices

    def _check_generator(self, func, generator: torch.Generator, target: torch.device) -> None:
        gen_device = _logical(generator.device)
        if gen_device != target:
            raise DeviceMismatch(f"{_name(func)} draws a {target.type} tensor from a {gen_device.type} "
                                 f"generator. On a GPU this is \"Expected a '{target.type}' device type "
                                 f"for generator but found '{gen_device.type}'\"")

    # ------------------------------------------------------------------ special calls

    def _to(self, func, args, kwargs):
        t, rest = args[0], args[1:]
        if rest and isinstance(rest[0], torch.Tensor):  # t.to(other): other's device and dtype
            target, dtype = self.device_of(rest[0]), rest[0].dtype
            non_blocking, copy = (rest[1:2] or [kwargs.get("non_blocking", False)])[0], kwargs.get("copy", False)
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
            if device is None:
                return self._generic(func, args, kwargs)  # a dtype change: stays where it is
            target, copy = _logical(device), kwargs.get("copy", False)
        return self._move(t, target, dtype, non_blocking, copy)

    def _move(self, t: torch.Tensor, target: torch.device, dtype=None, non_blocking=False, copy=False):
        moved = target != self.device_of(t)
        out = t.to(device="cpu", dtype=dtype if dtype is not None else t.dtype,
                   non_blocking=non_blocking, copy=copy or moved)
        return self._mark(out, target) if moved or copy or out is not t else out

    def _cuda(self, func, args, kwargs):
        return self._move(args[0], CUDA, non_blocking=kwargs.get("non_blocking", False))

    def _cpu(self, func, args, kwargs):
        if self.device_of(args[0]).type == "cuda":
            self.host_reads += 1  # a blocking copy to the host waits for the GPU
        return self._move(args[0], CPU)

    def _numpy(self, func, args, kwargs):
        if self.device_of(args[0]).type == "cuda":
            raise DeviceMismatch(f"{_name(func)} of a tensor {tuple(args[0].shape)} on cuda: on a GPU "
                                 "this is \"can't convert cuda:0 device type tensor to numpy\"; call "
                                 ".cpu() first")
        return func(*args, **kwargs)

    def _pin_memory(self, func, args, kwargs):
        return args[0]  # pinned memory is CPU memory; there is no CUDA here to pin it with

    def _copy(self, func, args, kwargs):
        return func(*args, **kwargs)  # copy_ crosses devices on a GPU too; self keeps its device

    def _index(self, func, args, kwargs):
        """t[idx] / t[idx] = v: indices of a CPU tensor must be on the CPU (0-dim ones are ints);
        the assigned value may come from any device (it is copied)."""
        t, index = args[0], args[1]
        if self.device_of(t) == CPU:
            for i in tree_leaves(index):
                if isinstance(i, torch.Tensor) and i.ndim > 0 and self.device_of(i) != CPU:
                    raise DeviceMismatch(f"indexing a CPU tensor {tuple(t.shape)} with indices on cuda: on "
                                         "a GPU this is 'indices should be either on cpu or on the same "
                                         "device as the indexed tensor'")
        out = func(*args, **kwargs)
        return self._mark(out, CUDA) if self.device_of(t) == CUDA and out is not None else out

    def _get_device(self, func, args, kwargs):
        return 0 if self.device_of(args[0]).type == "cuda" else -1


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


_SPECIAL = {
    _T.to: LogicalDeviceMode._to, _T.cuda: LogicalDeviceMode._cuda, _T.cpu: LogicalDeviceMode._cpu,
    _T.numpy: LogicalDeviceMode._numpy, _T.__array__: LogicalDeviceMode._numpy,
    _T.pin_memory: LogicalDeviceMode._pin_memory, _T.copy_: LogicalDeviceMode._copy,
    _T.__getitem__: LogicalDeviceMode._index, _T.__setitem__: LogicalDeviceMode._index,
    _T.get_device: LogicalDeviceMode._get_device,
}


# Reads of a GPU tensor's value on the host: each one waits for the GPU (a host sync).
# And `.cpu()` (_cpu). Not `.to("cpu")`: torch's own internals call `.to(device)` with the real
# (CPU) device of tensors this checker marks as on the GPU (clip_grad_norm_), which on a GPU is no copy.
# torch.equal / allclose / is_nonzero return a Python value: they read the result on the host too.
_HOST_READS = {_T.item, _T.__bool__, _T.tolist, _T.__float__, _T.__int__, torch.equal, _T.equal,
               torch.allclose, _T.allclose, torch.is_nonzero, _T.is_nonzero}


# Calls that look at tensors on several devices without computing across them.
_UNCHECKED = {torch._has_compatible_shallow_copy_type, _T.__repr__, _T.__format__}


@contextlib.contextmanager
def logical_cuda() -> Iterator[LogicalDeviceMode]:
    """Run the body as on a one-GPU machine, checking device placement (see the module docstring)."""
    rng_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's state looks like
    fakes = {
        "is_available": lambda: True, "device_count": lambda: 1, "is_bf16_supported": lambda *a, **k: True,
        "current_device": lambda: 0, "set_device": lambda d: None, "synchronize": lambda *a: None,
        "get_rng_state_all": lambda: [rng_state.clone()], "set_rng_state_all": lambda states: None,
        "manual_seed_all": lambda seed: None, "manual_seed": lambda seed: None,
        "max_memory_allocated": lambda *a: 0, "reset_peak_memory_stats": lambda *a: None,
        "empty_cache": lambda: None, "mem_get_info": lambda *a: (80 * 2 ** 30, 80 * 2 ** 30),  # (free, total)
    }
    # torch's own internals (the optimizer's CUDA-graph check, DataLoader pinning) ask the
    # accelerator API: it answers "none", so they take their CPU paths.
    accel_fakes = {"current_accelerator": lambda *a, **k: None, "is_available": lambda: False}
    saved = {name: getattr(torch.cuda, name) for name in fakes}
    saved_accel = {name: getattr(torch.accelerator, name) for name in accel_fakes}
    saved_generator = torch.Generator
    saved_tf32 = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    mode = LogicalDeviceMode()
    try:
        for name, fake in fakes.items():
            setattr(torch.cuda, name, fake)
        for name, fake in accel_fakes.items():
            setattr(torch.accelerator, name, fake)
        torch.Generator = LogicalGenerator
        with mode:
            yield mode
    finally:
        torch.Generator = saved_generator
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        for name, fn in saved_accel.items():
            setattr(torch.accelerator, name, fn)
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved_tf32
