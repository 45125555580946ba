"""The oracle of the memory model: the peak bytes of live tensor storage while code runs.

``PeakTracker`` is a TorchDispatchMode: every operator's outputs are seen as they are created, and each
new storage is counted until it is freed (a finalizer on the storage). Tensors that existed before the
mode was entered (weights, gradient buffers, optimizer state) are counted with ``track``. This sees
what autograd keeps for backward, every temporary an operator returns, and communication buffers;
it does not see scratch memory an operator allocates and frees inside one kernel (a fused kernel's
workspace), which the estimates leave out as well. Works on every device (on CUDA,
``torch.cuda.max_memory_allocated`` also counts what the caching allocator rounds up).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as tracker: ...``; then ``tracker.peak`` and ``tracker.current`` (bytes)."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor) -> None:
        """Count ``tensor``'s storage (once, however many views of it are passed) until it is freed."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def ignore(self, tensor) -> None:
        """Never count ``tensor``'s storage: memory outside the run's working set (a corpus held in
        memory, whose samples are views of it)."""
        if isinstance(tensor, torch.Tensor):
            self._live.setdefault(tensor.untyped_storage()._cdata, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out
