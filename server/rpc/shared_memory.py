"""System shared memory regions, Triton's extension: a client on the same host puts tensors in a POSIX shared
memory segment, registers it once, and requests name the region instead of carrying the bytes.

Inputs are read from the segment and outputs written into it with pread/pwrite on a descriptor held per segment,
not through a memory mapping: the client owns the segment and may shrink it at any time, and touching a mapping
past the end of a shrunk file kills the whole server with SIGBUS, where a short read is an error for one request.
The response carries an output's shape and datatype with an empty raw_output_contents entry, as Triton's does.

Off unless the server is started with `--shared-memory system`: a registered key opens any segment in /dev/shm
that the server's user may open, and an identity allowed to infer could read it back through a model. Triton serves
the extension to every caller; here an operator turns it on for hosts whose local clients are trusted.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.errors import InvalidRequestError, TensorgateError, UnimplementedError

MAX_REGIONS = 256
"""Regions registered at once: each holds a descriptor, and descriptors are also what new connections need."""

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"

SHM_ROOT = Path("/dev/shm")
"""Where Linux keeps POSIX shared memory: shm_open("/name") opens /dev/shm/name."""

OFF_MESSAGE = "system shared memory is off on this server (start it with --shared-memory system)"


class RegionError(TensorgateError):
    """A region that cannot be registered (a bad key, offset or size), or used (a shrunk segment, an output that
    does not fit)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RegionNotFoundError(TensorgateError):
    code = grpc.StatusCode.NOT_FOUND


class RegionExistsError(TensorgateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class RegionLimitError(TensorgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def _integer(param: pb.InferParameter) -> int | None:
    choice = param.WhichOneof("parameter_choice")
    return int(getattr(param, choice)) if choice in ("int64_param", "uint64_param") else None


class _Segment:
    """An open segment, shared by the regions registered on it. Closed when the last holder lets go (an
    unregistered region's requests still in flight keep it open), so a descriptor number is never reused under a
    request that still writes to it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    segment: _Segment


@dataclass(frozen=True, slots=True)
class Slice:
    """The bytes one tensor names: `size` bytes at `start` of the region's segment."""

    region: Region
    start: int
    size: int

    def read(self) -> bytes:
        data = os.pread(self.region.segment.fd, self.size, self.start)
        if len(data) < self.size:
            raise RegionError(
                f"shared memory region '{self.region.name}' holds fewer bytes than registered: key "
                f"'{self.region.key}' was shrunk"
            )
        return data

    def write(self, data: bytes) -> None:
        """Into the segment as registered: a segment the client shrank is refused, not silently grown back.

        NOTE: a shrink that lands between the size check and pwrite is not seen, and the write grows the segment
        back to the output's end (never past the range the client registered). Linux has no write that stops at
        the end of a file; a kernel-side copy into a shared mapping would (a page past the end fails the copy
        with EFAULT, not SIGBUS), but costs 2.5 times pwrite's copy and a second descriptor per segment, which
        only a client racing its own segment would be spared."""
        if len(data) > self.size:
            raise RegionError(
                f"the output takes {len(data)} bytes, more than the {self.size} given in shared memory region "
                f"'{self.region.name}'"
            )
        fd = self.region.segment.fd
        end = self.start + len(data)
        if end > os.fstat(fd).st_size:
            raise RegionError(
                f"shared memory region '{self.region.name}' holds fewer bytes than registered: key "
                f"'{self.region.key}' was shrunk"
            )
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], self.start + written)


def _segment_path(key: str) -> Path:
    """shm_open's rules: one name, with or without a leading '/', and no other '/'."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise RegionError(f"shared memory key {key!r} is not a POSIX shared memory name (like '/input0')")
    return SHM_ROOT / name


class SystemSharedMemory:
    """The regions registered on this server, by name. Registration happens on the event loop; reads from the
    request path take the current dict without a lock."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._regions: dict[str, Region] = {}
        self._segments: weakref.WeakValueDictionary[tuple[int, int], _Segment] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def require(self, rpc: str) -> None:
        """The extension's RPCs answer UNIMPLEMENTED, naming the flag, while it is off."""
        if not self.enabled:
            raise UnimplementedError(f"{rpc}: {OFF_MESSAGE}")

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise RegionError("a shared memory region needs a name")
        if offset < 0 or byte_size <= 0:
            raise RegionError(
                f"shared memory region '{name}': offset {offset} and byte_size {byte_size} must be >= 0 and > 0"
            )
        path = _segment_path(key)
        with self._lock:
            if name in self._regions:
                raise RegionExistsError(f"shared memory region '{name}' is already registered")
            if len(self._regions) >= MAX_REGIONS:
                raise RegionLimitError(
                    f"shared memory region '{name}': {MAX_REGIONS} regions are registered, the most this server "
                    "keeps; unregister some first"
                )
            try:
                # Non-blocking: a FIFO planted in /dev/shm must not hang the event loop in open().
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # the server's limit, not a bad key
                    raise RegionLimitError(
                        f"shared memory region '{name}': cannot open key '{key}': the server is out of file "
                        f"descriptors ({os.strerror(exc.errno)}); unregister regions, or raise its limit (ulimit -n)"
                    ) from exc
                reason = "no such segment" if exc.errno == errno.ENOENT else os.strerror(exc.errno or 0)
                raise RegionError(f"shared memory region '{name}': cannot open key '{key}': {reason}") from exc
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise RegionError(f"shared memory region '{name}': key '{key}' is not a shared memory segment")
                if offset + byte_size > info.st_size:
                    raise RegionError(
                        f"shared memory region '{name}': offset {offset} + byte_size {byte_size} is past the end "
                        f"of key '{key}' ({info.st_size} bytes)"
                    )
            except BaseException:
                # Closed now, not by a collection: the refusal's traceback would keep a _Segment (and so the
                # descriptor) alive until then, and a client retrying a bad registration would run the server
                # out of descriptors.
                os.close(fd)
                raise
            # Regions of one segment share its descriptor; a second descriptor on a segment already open closes.
            segment = self._segments.setdefault((info.st_dev, info.st_ino), _Segment(fd))
            self._regions = {**self._regions, name: Region(name, key, offset, byte_size, segment)}

    def unregister(self, name: str) -> None:
        """One region, or all of them for ""; an unknown name is no error (as in Triton)."""
        with self._lock:
            if not name:
                self._regions = {}
            elif name in self._regions:
                self._regions = {k: v for k, v in self._regions.items() if k != name}

    def status(self, name: str) -> list[Region]:
        regions = self._regions
        if not name:
            return [regions[k] for k in sorted(regions)]
        if name not in regions:
            raise RegionNotFoundError(f"shared memory region '{name}' is not registered")
        return [regions[name]]

    def slice(self, params: Mapping[str, pb.InferParameter], *, model: str, version: str, tensor: str) -> Slice:
        """The bytes a tensor's `shared_memory_*` parameters name; errors name the model and tensor."""

        def bad(detail: str) -> InvalidRequestError:
            return InvalidRequestError(model, version, detail, tensor=tensor)

        if not self.enabled:
            raise bad(OFF_MESSAGE)
        region = params[REGION]
        if region.WhichOneof("parameter_choice") != "string_param":
            raise bad(f"parameter '{REGION}' must be a string")
        if BYTE_SIZE not in params:
            raise bad(f"parameter '{BYTE_SIZE}' must come with '{REGION}'")
        byte_size = _integer(params[BYTE_SIZE])
        offset = _integer(params[OFFSET]) if OFFSET in params else 0
        if byte_size is None or offset is None:
            raise bad(f"parameters '{OFFSET}' and '{BYTE_SIZE}' must be integers")
        name = region.string_param
        found = self._regions.get(name)
        if found is None:
            raise bad(f"shared memory region '{name}' is not registered")
        if offset < 0 or byte_size < 0 or offset + byte_size > found.byte_size:
            raise bad(
                f"offset {offset} + byte_size {byte_size} is outside shared memory region '{name}' "
                f"({found.byte_size} bytes)"
            )
        return Slice(found, found.offset + offset, byte_size)


def encode_status(regions: list[Region]) -> pb.SystemSharedMemoryStatusResponse:
    msg = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        entry = msg.regions[r.name]
        entry.name, entry.key, entry.offset, entry.byte_size = r.name, r.key, r.offset, r.byte_size
    return msg
