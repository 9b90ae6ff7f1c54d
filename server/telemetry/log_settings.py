"""Triton's LogSettings RPC over Python logging: read and change the server's log level while it runs.

An operator turns on the access lines (`log_verbose_level: 1`, the DEBUG level) during an incident and off again,
without a restart. Python levels are thresholds, so the settings are too: turning a kind on turns the more severe
ones on with it, and a request that asks for a more severe kind off while a less severe one is on is refused
rather than half applied. Where logs go and their format are fixed at start (stderr, `--log-format`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

LogValue = bool | int | str

KEYS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
_TYPES: dict[str, type] = {
    "log_file": str,
    "log_info": bool,
    "log_warning": bool,
    "log_error": bool,
    "log_verbose_level": int,
    "log_format": str,
}
_KINDS = ("log_info", "log_warning", "log_error")
"""Least severe first: each one on implies those after it."""
FORMAT_ALIASES = {"default": "text"}
"""Triton's name for its plain format, accepted for ours."""
_verbose = {"level": 1}
"""The verbose level last set, read back while the root level is DEBUG (Python has one DEBUG level)."""


class LogSettingsError(ValueError):
    """A change that cannot be made; the message names the setting."""


def current(log_format: str) -> dict[str, LogValue]:
    """The settings as Triton names them, read from the root logger's level."""
    level = logging.getLogger().getEffectiveLevel()
    return {
        "log_file": "",
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": _verbose["level"] if level <= logging.DEBUG else 0,
        "log_format": log_format,
    }


def level_of(settings: Mapping[str, LogValue]) -> int:
    """The root level that shows what `settings` ask for; LogSettingsError for a combination no threshold gives."""
    for i, less in enumerate(_KINDS):
        for more in _KINDS[i + 1 :]:
            if settings[less] and not settings[more]:
                raise LogSettingsError(f"{more} cannot be off while {less} is on: log levels are thresholds here")
    if settings["log_verbose_level"]:
        if not settings["log_info"]:
            raise LogSettingsError("log_verbose_level needs log_info on: log levels are thresholds here")
        return logging.DEBUG
    for kind, level in zip(_KINDS, (logging.INFO, logging.WARNING, logging.ERROR), strict=True):
        if settings[kind]:
            return level
    return logging.CRITICAL


def plan(changes: Mapping[str, LogValue], log_format: str) -> int:
    """Check every change and return the root level they make; nothing is set here, so that the caller can log
    the change before a higher level would hide that line."""
    settings = current(log_format)
    for key, value in changes.items():
        if key not in _TYPES:
            raise LogSettingsError(f"unknown log setting '{key}' (known: {', '.join(KEYS)})")
        want = _TYPES[key]
        if type(value) is not want:
            kind = {bool: "a bool", int: "a uint32", str: "a string"}[want]
            raise LogSettingsError(f"log setting '{key}' must be {kind}")
        if key == "log_file" and value != "":
            raise LogSettingsError("log_file cannot be set: tensorgate logs to stderr")
        if key == "log_format" and FORMAT_ALIASES.get(str(value), value) != log_format:
            raise LogSettingsError(f"log_format is fixed at start (--log-format); this server writes '{log_format}'")
        if key not in ("log_file", "log_format"):
            settings[key] = value
    # Turning a kind on turns the more severe kinds on with it, unless the request itself says otherwise.
    on = ["log_info"] if changes.get("log_verbose_level") else []
    on += [k for k in _KINDS if changes.get(k) is True]
    for kind in on:
        for more in _KINDS[_KINDS.index(kind) :]:
            if more not in changes:
                settings[more] = True
    return level_of(settings)


def apply(level: int, changes: Mapping[str, LogValue]) -> None:
    """Set the level `plan` returned."""
    verbose = changes.get("log_verbose_level")
    if isinstance(verbose, int) and verbose > 0:
        _verbose["level"] = verbose
    logging.getLogger().setLevel(level)


__all__ = ["KEYS", "LogSettingsError", "LogValue", "apply", "current", "level_of", "plan"]
