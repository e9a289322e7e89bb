"""Wall time and peak memory of one call, on the CPU or a CUDA device.

Time: the median of repeated calls after warm-up calls, with the device synchronised around
each call, as wall time and as process CPU time. Memory, two measures:

- ``tensor_peak_bytes``: the peak of tensor memory allocated during the call and not present
  before it. On CUDA this is ``torch.cuda.max_memory_allocated()`` minus the allocation at the
  start (after ``reset_peak_memory_stats``). torch keeps no allocator statistics on the CPU,
  so there the call runs under a ``TorchDispatchMode`` that follows every tensor storage
  created by an operator inside the call (autograd's backward included) until it is freed.
  The peak of their sum is reported. It counts tensor storages only: no Python objects, no
  allocator slack, and no scratch memory that an operator frees before returning.
- ``rss_peak_delta_bytes``: the process resident set size, sampled every millisecond by a
  thread (psutil) during the same call, peak minus the value before it. It includes allocator
  slack and memory the C library keeps after a free, so it reads zero when the call fits in
  memory an earlier call left behind, and it misses peaks shorter than a sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import statistics
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "Timing",
    "synchronize",
    "time_call",
    "time_interleaved",
    "StorageTracker",
    "peak_memory",
    "rss_bytes",
    "live_tensor_bytes",
]

logger = logging.getLogger(__name__)

_PROCESS = psutil.Process(os.getpid())


@dataclasses.dataclass
class Timing:
    """Repeated times of one call, in seconds: wall clock and process CPU time.

    The CPU time (``time.process_time``, all threads of the process summed) leaves out the time
    the process waits for a core, so on a shared machine it varies less than the wall time.
    """

    samples: list[float] = dataclasses.field(default_factory=list)
    cpu_samples: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples)

    def measure(self, fn: Callable[[], Any], device: torch.device) -> None:
        """Call ``fn`` once and append its wall and CPU times."""
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        self.cpu_samples.append(time.process_time() - cpu)
        self.samples.append(time.perf_counter() - wall)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": min(self.samples),
            "max_s": max(self.samples),
            "cpu_median_s": self.cpu_median,
            "repeats": len(self.samples),
        }


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 2.0,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` after ``warmup`` calls: at least ``min_repeats`` calls, then more until
    ``budget_s`` seconds of calls or ``max_repeats`` calls.

    ``setup``, if given, runs untimed before every call (warm-up calls included).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    timing = Timing()
    while len(timing.samples) < max_repeats:
        if setup is not None:
            setup()
        timing.measure(fn, device)
        if len(timing.samples) >= min_repeats and sum(timing.samples) >= budget_s:
            break
    return timing


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 5,
) -> dict[str, Timing]:
    """Time several calls in turn (a, b, a, b, ...) so that drifting machine load hits all.

    Returns one :class:`Timing` per key of ``fns``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timings = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timings[name].measure(fn, device)
    return timings


def rss_bytes() -> int:
    """Return the resident set size of this process in bytes."""
    return int(_PROCESS.memory_info().rss)


@contextlib.contextmanager
def _sampled_rss_peak(interval_s: float = 1e-3) -> Iterator[dict[str, int]]:
    """Sample the RSS in a thread while the block runs; yields a dict filled on exit."""
    result = {"start": rss_bytes(), "peak": 0}
    result["peak"] = result["start"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], rss_bytes())


class StorageTracker(TorchDispatchMode):
    """Follow every tensor storage created inside the mode; record the peak of their sum.

    A storage counts from the first operator output that uses it until it is freed (a weak
    reference callback). Storages resized in place after creation keep their first size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, functools.partial(self._free, key, size))

    def _free(self, key: int, size: int, _ref: weakref.ref) -> None:
        self._refs.pop(key, None)
        self.live -= size


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Call ``fn`` once and return its peak memory (the module docstring defines the fields)."""
    synchronize(device)
    tracker = StorageTracker() if device.type != "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with _sampled_rss_peak() as rss:
        with tracker:
            fn()
        synchronize(device)
    if device.type == "cuda":
        tensor_peak = torch.cuda.max_memory_allocated(device) - before
        method = "torch.cuda.max_memory_allocated"
    else:
        tensor_peak = tracker.peak
        method = "storage tracking (TorchDispatchMode)"
    return {
        "tensor_peak_bytes": int(tensor_peak),
        "tensor_method": method,
        "rss_peak_delta_bytes": rss["peak"] - rss["start"],
    }


def live_tensor_bytes() -> tuple[int, int]:
    """Return the number and total bytes of tensors reachable by the garbage collector.

    Storages shared by several tensors are counted once.
    """
    import gc

    count = 0
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # type() rather than isinstance(): isinstance() reads __class__, which some
            # deprecated module-level proxies turn into a warning.
            if not issubclass(type(obj), torch.Tensor):
                continue
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            count += 1
        except (ReferenceError, RuntimeError, NotImplementedError):
            continue
    return count, sum(storages.values())
