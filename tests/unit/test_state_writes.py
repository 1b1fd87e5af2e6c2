"""Every desktop state write goes through the state table's compare-and-swap.

The store has one method that writes ``desktops.state``
(``deskpool/store/desktops.py`` ``DesktopRepository._write_state``: the table's check, then
``UPDATE ... WHERE state = expected``). This test reads the package's source and fails on any
other way to write it: an UPDATE's ``.values(state=...)`` elsewhere, raw SQL that sets it, an
assignment to a desktop's ``.state``, or a new row born in any state but ``provisioning``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import deskpool

PACKAGE = Path(deskpool.__file__).parent
THE_ONE_WRITER = ("store/desktops.py", "_write_state")
RAW_STATE_UPDATE = re.compile(r"\bupdate\s+desktops\b.*\bset\b.*\bstate\s*=", re.I | re.S)


def _sources() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("store/migrations/"):
            continue  # schema history, not runtime writes
        found.append((relative, ast.parse(path.read_text(), filename=relative)))
    return found


def _functions_with_parents(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node's enclosing function name ("" at module level)."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) \
                else function
            owner[child] = name
            visit(child, name)

    visit(tree, "")
    return owner


def _docstrings(tree: ast.Module) -> set[ast.AST]:
    docs: set[ast.AST] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant):
            docs.add(body[0].value)
    return docs


def _updated_table(values: ast.Call) -> str | None:
    """The model a ``update(Model)....values(...)`` chain names; None when it cannot be told
    (a variable, another shape): such a chain is checked as if it were the desktops'."""
    node: ast.AST = values.func
    while isinstance(node, ast.Attribute | ast.Call):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "update":
            first = node.args[0] if node.args else None
            return first.id if isinstance(first, ast.Name) and first.id[:1].isupper() else None
        node = node.func if isinstance(node, ast.Call) else node.value
    return None


def find_state_writes() -> list[str]:
    """Places outside the one writer that write a desktop's state, as "file:line: what"."""
    offences: list[str] = []
    for relative, tree in _sources():
        owner = _functions_with_parents(tree)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{relative}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "values" \
                    and any(k.arg == "state" for k in node.keywords) \
                    and _updated_table(node) in (None, "Desktop") \
                    and (relative, owner.get(node, "")) != THE_ONE_WRITER:
                offences.append(f"{where}: UPDATE ... .values(state=...)")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "Desktop":
                born = next((k.value for k in node.keywords if k.arg == "state"), None)
                if born is not None and ast.unparse(born) not in (
                        "DesktopState.PROVISIONING", "S.PROVISIONING"):
                    offences.append(f"{where}: a desktop row born as {ast.unparse(born)}")
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == "state" and \
                            "host" not in ast.unparse(target.value).lower():
                        offences.append(f"{where}: assigns {ast.unparse(target)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node not in docs and RAW_STATE_UPDATE.search(node.value):
                offences.append(f"{where}: raw SQL sets desktops.state")
    return offences


def test_no_desktop_state_write_bypasses_the_table() -> None:
    assert find_state_writes() == []


def test_the_scan_finds_each_kind_of_bypass(tmp_path: Path, monkeypatch: object) -> None:
    """The scan is not vacuous: each forbidden shape, planted in a module, is reported."""
    import pytest

    planted = tmp_path / "deskpool"
    (planted / "broker").mkdir(parents=True)
    (planted / "broker" / "sneaky.py").write_text(
        "def claim(session, Desktop, update, text):\n"
        "    session.execute(update(Desktop).values(state='reserved'))\n"
        "    session.execute(text(\"UPDATE desktops SET state = 'ready' WHERE id = 1\"))\n"
        "    d = Desktop(name='x', state=DesktopState.READY)\n"
        "    d.state = 'in_use'\n"
        "    host.state = 'down'\n"  # a host's state is not a desktop's: allowed
    )
    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", planted)
    assert sorted(find_state_writes()) == [
        "broker/sneaky.py:2: UPDATE ... .values(state=...)",
        "broker/sneaky.py:3: raw SQL sets desktops.state",
        "broker/sneaky.py:4: a desktop row born as DesktopState.READY",
        "broker/sneaky.py:5: assigns d.state",
    ]
