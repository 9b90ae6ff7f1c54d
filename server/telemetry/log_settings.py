"""Triton's LogSettings RPC over Python logging: read and change the server's log level while it runs.

An operator turns on the access lines (`log_verbose_level: 1`, the DEBUG level) during an incident and off again,
without a restart. Python levels are thresholds, so the settings are too: a more severe kind cannot be off while a
less severe one is on, and such a request is refused rather than half applied. Where logs go and their format are
fixed at start (stderr, `--log-format`).
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
FORMAT_ALIASES = {"default": "text"}
"""Triton's name for its plain format, accepted for ours."""


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
        "log_verbose_level": 1 if level <= logging.DEBUG else 0,
        "log_format": log_format,
    }


def level_of(settings: Mapping[str, LogValue]) -> int:
    """The root level that shows what `settings` ask for; LogSettingsError for a combination no threshold gives."""
    kinds = [("log_info", settings["log_info"]), ("log_warning", settings["log_warning"])]
    kinds.append(("log_error", settings["log_error"]))
    for (less, on), (more, more_on) in zip(kinds, kinds[1:], strict=False):
        if on and not more_on:
            raise LogSettingsError(f"{more} cannot be off while {less} is on: log levels are thresholds here")
    if settings["log_verbose_level"]:
        if not settings["log_info"]:
            raise LogSettingsError("log_verbose_level needs log_info on: log levels are thresholds here")
        return logging.DEBUG
    for (_, on), level in zip(kinds, (logging.INFO, logging.WARNING, logging.ERROR), strict=True):
        if on:
            return level
    return logging.CRITICAL


def apply(changes: Mapping[str, LogValue], log_format: str) -> dict[str, LogValue]:
    """Check every change, then set the root level once; returns the settings now in force."""
    settings = current(log_format)
    if changes.get("log_verbose_level") and not any(k in changes for k in ("log_info", "log_warning", "log_error")):
        # Verbose means everything, from wherever the level was (a server at WARNING included).
        settings.update(log_info=True, log_warning=True, log_error=True)
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
    level = level_of(settings)
    logging.getLogger().setLevel(level)
    return current(log_format)


__all__ = ["KEYS", "LogSettingsError", "LogValue", "apply", "current", "level_of"]
