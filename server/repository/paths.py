"""The one rule for a file that a config (or a load request) names inside a model's directory.

A config may come from a caller (RepositoryModelLoad's override and uploaded files), so the files it names must
not lead the server to read or write anywhere else: the name is a relative path that cannot climb (no `..`, not
absolute), and what it reaches once symlinks are followed stays inside the directory. Each caller words its own
error; this module only decides.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def relative_path(text: str) -> PurePosixPath | None:
    """`text` as a relative path that cannot leave the folder it is joined to by its spelling alone, or None: empty
    (or only `.`), absolute, with a `..` part or a NUL (which the file system would refuse with an error of its own).
    Links are `inside`'s part."""
    if "\0" in text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        return None
    return path


def within(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks followed, is `root` or under it (`root` resolved too). A link loop, or a path the
    system cannot resolve, is not."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python before 3.13)
        return False


def inside(folder: Path, text: str, *, root: Path | None = None) -> Path | None:
    """`folder / text` when `text` is a `relative_path` and the file it reaches, symlinks followed, stays within
    `root` (default: `folder`); else None. Whether the file exists is the caller's question."""
    rel = relative_path(text)
    if rel is None:
        return None
    path = folder / rel
    return path if within(path, folder if root is None else root) else None
