"""When a watched file has changed: what the server's watchers compare (the TLS files, the policy file, the model
repository's poll, the drift profiles)."""

from __future__ import annotations

import os

__all__ = ["FileStamp", "file_stamp"]

FileStamp = tuple[int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """Size, mtime, inode and ctime. Size and mtime alone miss a replacement of the same size whose copy kept the
    old mtime: `cp -p`, `rsync -a`, `tar -x` and container image layers (often at a fixed time, for reproducible
    builds) all keep it, and a retrained model of the same architecture has the same size. The inode changes when
    the file is replaced (a rename over it, a Kubernetes volume's symlink swap) and the ctime whenever it is
    written; no copying tool sets either. A chmod or chown changes the ctime too: a harmless extra reload."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns
