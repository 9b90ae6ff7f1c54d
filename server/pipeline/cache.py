"""Triton's response cache: outputs of models whose config says `response_cache { enable: true }`, reused for
requests that repeat exactly, so the model does not run again.

One least-recently-used cache for the server, bounded in bytes (`--response-cache-bytes`), the entries' own
overhead counted with their tensors (ENTRY_BYTES, ARRAY_BYTES). The key is a digest of
the model, its version and files (so a version reloaded with new files never answers with the old one's outputs),
each input's name, datatype, shape and bytes, and the outputs asked for. Triton's own key leaves out datatypes,
shapes and requested outputs, so two requests with the same bytes in other shapes, or asking for other outputs,
share an entry there; here they do not. The cache belongs on the event loop: no locks.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

Outputs = dict[str, np.ndarray]

ENTRY_BYTES = 384
"""What an entry costs beside its tensors: its key, the LRU node, the tuple and the dict of outputs (measured with
tracemalloc: about 370 bytes). Counted, so that --response-cache-bytes bounds the memory the cache holds: small
answers cost mostly this, and answers with no elements cost nothing else (they would never be evicted)."""
ARRAY_BYTES = 128
"""What each output array costs beside its data (the numpy object; about 125 bytes)."""


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == object:  # BYTES: the elements' own bytes, plus a pointer each
        return sum(len(v) for v in array.ravel().tolist()) + 8 * array.size + ARRAY_BYTES
    return array.nbytes + ARRAY_BYTES


class ResponseCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"the response cache needs a positive size, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[bytes, tuple[Outputs, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(
        identity: tuple[str, int, str],
        inputs: Mapping[str, np.ndarray],
        datatypes: Mapping[str, str],
        outputs: Sequence[str],
    ) -> bytes:
        """`identity` is (model, version, signature of its files); `inputs` as the model takes them."""
        h = hashlib.blake2b(digest_size=20)
        name, version, signature = identity
        h.update(f"{name}\0{version}\0{signature}\0".encode())
        for tensor in sorted(inputs):
            array = inputs[tensor]
            h.update(f"{tensor}\0{datatypes.get(tensor, '')}\0{array.shape}\0".encode())
            if array.dtype == object:
                for item in array.ravel().tolist():
                    data = item if isinstance(item, bytes) else str(item).encode()
                    h.update(len(data).to_bytes(8, "little"))
                    h.update(data)
            elif array.size:  # the bytes in place, without a copy (an empty tensor has none: its shape says it all)
                # As uint8: a bfloat16 array exports no buffer of its own.
                h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        h.update("\0".join(outputs).encode())
        return h.digest()

    def get(self, key: bytes) -> Outputs | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, results: Outputs) -> bool:
        """Keep copies of `results` (they may be views into a whole batch's output); False when they alone are
        larger than the cache. The least recently used entries make room."""
        size = ENTRY_BYTES + sum(_nbytes(a) for a in results.values())
        if size > self.capacity:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old[1]
        while self.used + size > self.capacity:
            _, (_, freed) = self._entries.popitem(last=False)
            self.used -= freed
            self.evictions += 1
        kept: Outputs = {}
        for name, array in results.items():
            copy = np.array(array, copy=True)
            copy.flags.writeable = False  # answers share it: nothing may change it in place
            kept[name] = copy
        self._entries[key] = (kept, size)
        self.used += size
        return True
