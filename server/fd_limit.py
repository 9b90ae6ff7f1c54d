"""The process's open-file limit, raised to its hard limit when `tensorgate serve` starts.

Each client connection, model file, shared-memory region and metrics scrape takes a file descriptor, and many
systems start a process with a soft limit of 1024 (a shell's `ulimit -n`, systemd's default for services) under a
hard limit hundreds of times that. A server with a thousand clients then refuses connections it had every right to
take: they wait in the kernel's queue until their deadline. The soft limit stays low by default for programs that
use select(), which cannot watch a descriptor past 1024; nothing in this server does (gRPC and asyncio use epoll,
the metrics port poll). Go's runtime raises it the same way, since 1.19 (it also lowers it again for the programs
it starts; the one process this server starts, the span exporter, is its own).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["raise_open_file_limit"]

log = logging.getLogger(__name__)

CEILING = 1 << 20
"""The most asked for when the hard limit is unlimited: Linux's default nr_open, past which setrlimit fails."""
DARWIN_CEILING = 10240
"""macOS's OPEN_MAX: its hard limit reads unlimited, but setrlimit refuses more than the per-process maximum."""


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard one (as far as the system allows); (before, after) when it rose,
    None when it was there already or cannot be changed (not on a POSIX system, or refused: then the limit stays
    as it was, and is said)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = CEILING if hard == resource.RLIM_INFINITY else hard
    if sys.platform == "darwin":
        target = min(target, DARWIN_CEILING)
    if soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open file limit: cannot raise it from %d to %d (%s); it stays at %d", soft, target, exc, soft)
        return None
    return soft, target
