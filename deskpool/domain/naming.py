"""Naming patterns such as ``lab-{n:03}``: the only placeholder is ``n``, a positive integer."""

from __future__ import annotations

import string

from deskpool.domain.errors import InvalidInput
from deskpool.domain.identity import validate_hostname


def validate_pattern(pattern: str) -> str:
    """Check a pattern once, when it is stored, so rendering can never fail later."""
    fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    if fields != ["n"]:
        raise InvalidInput(
            f"naming pattern {pattern!r} must contain the placeholder {{n}} exactly once "
            "(for example 'lab-{n:03}')"
        )
    try:
        sample = pattern.format(n=1)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"naming pattern {pattern!r} is not valid: {exc}") from exc
    try:
        validate_hostname(sample)
    except InvalidInput as exc:
        raise InvalidInput(
            f"naming pattern {pattern!r} gives {sample!r}, which is not a valid hostname"
        ) from exc
    return pattern


def render(pattern: str, n: int) -> str:
    return validate_hostname(pattern.format(n=n))


def first_free_number(pattern: str, taken: set[str], start: int = 1) -> int:
    """The smallest n >= ``start`` whose rendered name is not taken."""
    n = start
    while render(pattern, n) in taken:
        n += 1
    return n
