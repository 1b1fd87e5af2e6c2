"""The store alone talks SQL.

import-linter keeps SQLAlchemy out of every package but ``deskpool.store`` (pyproject.toml,
"The store alone talks SQL"). The unit of work still holds its SQLAlchemy session as
``uow.session``, for the store's repositories and for tests that arrange rows behind the
services' backs; this test keeps the rest of the package from reaching through it.
"""

from __future__ import annotations

import re
from pathlib import Path

import deskpool

PACKAGE = Path(deskpool.__file__).parent
RAW_SESSION = re.compile(r"\.session\b(?!_)")


def test_no_module_outside_the_store_uses_the_units_sql_session() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "store"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if RAW_SESSION.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == []
