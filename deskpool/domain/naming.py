"""Naming patterns such as ``lab-{n:03}``: the only placeholder is ``n``, a positive integer."""

from __future__ import annotations

import string

from deskpool.domain.errors import InvalidInput
from deskpool.domain.identity import validate_hostname

# Room a pattern must leave for n: a pool holds at most 100,000 desktops, and numbers freed by
# retired desktops are reused first.
LARGEST_N = 999_999


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
    # The largest number checked too: a pattern whose names outgrow a hostname as the pool
    # grows would otherwise fail every later pass of the reconciler over this pool.
    for name in (sample, pattern.format(n=LARGEST_N)):
        try:
            validate_hostname(name)
        except InvalidInput as exc:
            raise InvalidInput(
                f"naming pattern {pattern!r} gives {name!r}, which is not a valid hostname "
                f"(names up to n={LARGEST_N} must be 1-63 characters of a-z, 0-9 and '-')"
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
