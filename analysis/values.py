"""Strict parsing of values that come from outside (URL query strings, API arguments, callback
payloads): Python's ``int`` also accepts "1_0", " 7 ", "٣" and True, which a link must not."""
from __future__ import annotations

import re

_INT = re.compile(r"-?[0-9]{1,18}")


def strict_int(value) -> int:
    """An int from an int (not a bool), an integral float, or a string of ASCII digits with an
    optional leading minus (at most 18 digits); ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    raise ValueError(f"{value!r} is not an integer")
