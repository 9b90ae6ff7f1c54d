"""Triton's response cache: outputs of models whose config says `response_cache { enable: true }`, reused for
requests that repeat exactly, so the model does not run again.

One least-recently-used cache for the server, bounded in bytes (`--response-cache-bytes`), the entries' own
overhead counted with their tensors (ENTRY_BYTES, ARRAY_BYTES). The key is a digest of
the model, its version and files (so a version reloaded with new files never answers with the old one's outputs),
each input's name, datatype, shape and bytes, and the outputs asked for. Triton's own key leaves out datatypes,
shapes and requested outputs, so two requests with the same bytes in other shapes, or asking for other outputs,
share an entry there; here they do not. The cache belongs on the event loop: no locks. Its pure parts, the key
and an entry's copies, run on a worker thread for large tensors (`heavy`).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Outputs = dict[str, np.ndarray]

ENTRY_BYTES = 384
"""What an entry costs beside its tensors: its key, the LRU node, the tuple and the dict of outputs (measured with
tracemalloc: about 370 bytes). Counted, so that --response-cache-bytes bounds the memory the cache holds: small
answers cost mostly this, and answers with no elements cost nothing else (they would never be evicted)."""
ARRAY_BYTES = 128
"""What each output array costs beside its data (the numpy object; about 125 bytes)."""


HEAVY_COST = 1 << 20
"""Tensors costing more than this to hash or copy (bytes, and ~100 per BYTES element, which costs that much more)
are hashed and copied on a worker thread: on the loop, the key of 1M BYTES elements held every other caller for
120 ms, and 64 MiB of FP32 for 77 ms."""

Entry = tuple[Outputs, int]
"""Read-only copies of an answer's outputs, and the bytes they count for."""


def heavy(arrays: Iterable[np.ndarray]) -> bool:
    """Whether the key or entry of these tensors is work for a worker thread rather than the event loop."""
    return sum(100 * a.size if a.dtype == object else a.nbytes for a in arrays) > HEAVY_COST


def tensor_bytes(array: np.ndarray) -> int:
    """The bytes a tensor's data holds: `nbytes`, or for BYTES (an object array) its elements' own bytes plus a
    pointer each, which `nbytes` leaves out (the byte budget of requests in flight counts tensors this way too)."""
    if array.dtype.hasobject:
        return sum(map(len, array.ravel().tolist())) + 8 * array.size
    return array.nbytes


class ResponseCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"the response cache needs a positive size, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()

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
                # Every length, then every element: as exact as framing each, at a fraction of the calls.
                items = array.ravel().tolist()
                try:
                    joined = b"".join(items)
                except TypeError:  # str elements (an ensemble step's ONNX string output)
                    items = [v if isinstance(v, bytes) else str(v).encode() for v in items]
                    joined = b"".join(items)
                h.update(np.fromiter(map(len, items), "<u8", len(items)).data)
                h.update(joined)
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

    def entry(self, results: Outputs) -> Entry | None:
        """Copies of `results` to keep (they may be views into a whole batch's output), read-only since answers
        share them; None when they alone are larger than the cache. Pure: it may run on a worker thread."""
        size = ENTRY_BYTES + sum(tensor_bytes(a) + ARRAY_BYTES for a in results.values())
        if size > self.capacity:
            return None
        kept: Outputs = {}
        for name, array in results.items():
            copy = np.array(array, copy=True)
            copy.flags.writeable = False
            kept[name] = copy
        return kept, size

    def put(self, key: bytes, entry: Entry | None) -> bool:
        """Keep `entry` (from `entry`); False for None. The least recently used entries make room."""
        if entry is None:
            return False
        size = entry[1]
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old[1]
        while self.used + size > self.capacity:
            _, (_, freed) = self._entries.popitem(last=False)
            self.used -= freed
            self.evictions += 1
        self._entries[key] = entry
        self.used += size
        return True
