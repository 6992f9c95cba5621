"""Read buffers the streaming merge reuses from one tensor name to the next.

Touching freshly allocated memory costs a page fault per 4 KiB page, which on a virtual
machine costs as much as reading the data itself (measured: filling fresh memory at
1.2 GB/s, memory used before at 8.6 GB/s). The merge reads 1 + T tensors per name, and the
names of a layer repeat the shapes of the previous layer, so it reads into buffers of the
tensors it has written (handed back with :meth:`Buffers.give`) instead of new memory. A
buffer size unused for ``horizon`` tensor names is freed (the token embedding's after it is
merged), so memory stays bounded by the tensors in flight, as without reuse.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class Buffers:
    """Uninitialised CPU tensors, recycled by size in bytes (thread-safe)."""

    def __init__(self, horizon: int = 64):
        self.horizon = horizon
        self._free: dict[int, list[Tensor]] = {}  # bytes -> flat uint8 buffers
        self._used: dict[int, int] = {}           # bytes -> clock of its last request
        self._lent: set[int] = set()              # data pointers of buffers handed out
        self._clock = 0
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous tensor, in a buffer handed back earlier if any."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            self._used[nbytes] = self._clock
            free = self._free.get(nbytes)
            raw = free.pop() if free else None
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent.add(raw.data_ptr())
        return raw.view(dtype).reshape(shape)

    def give(self, *tensors: Tensor | None) -> None:
        """Take back tensors made by :meth:`empty` that their user is done with (nothing
        may use them afterwards); anything else (None, a tensor of other memory or on
        another device) is ignored."""
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cpu":
                continue
            with self._lock:
                if tensor.data_ptr() not in self._lent:
                    continue
                self._lent.discard(tensor.data_ptr())
                raw = tensor.reshape(-1).view(torch.uint8)
                self._free.setdefault(raw.numel(), []).append(raw)

    def tick(self) -> None:
        """The next tensor name: free the buffers of sizes not asked for in ``horizon``
        names."""
        with self._lock:
            self._clock += 1
            for nbytes, used in list(self._used.items()):
                if self._clock - used > self.horizon:
                    self._free.pop(nbytes, None)
                    del self._used[nbytes]
