"""Whole numbers written in text by callers and files: versions, directory names, rates, counts.

Why not `str.isdigit()` + `int()`: isdigit() accepts every Unicode digit ("²", "①", "٣"), some of which int()
refuses with a ValueError and others it reads; a stray ValueError inside an RPC is an INTERNAL error, not the
caller's NOT_FOUND or INVALID_ARGUMENT. Only ASCII digits are numbers here, and a bound on their count keeps
int() from refusing (Python's 4300-digit limit) or reading values no field can hold.
"""

from __future__ import annotations


def parse_decimal(text: str, max_digits: int = 18) -> int | None:
    """`text` as a non-negative int when it is 1..max_digits ASCII digits (leading zeros allowed); else None."""
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def parse_canonical(text: str, max_digits: int = 18) -> int | None:
    """As parse_decimal, but only the number's own spelling: "1" is 1, "01" is None (model versions, whose
    directory "01" Triton does not load and whose name "01" it does not find)."""
    number = parse_decimal(text, max_digits)
    return number if number is not None and text == str(number) else None
