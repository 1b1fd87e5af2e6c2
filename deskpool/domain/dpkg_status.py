"""Three-way merge of dpkg's status file, one package stanza at a time.

When both the user (who installed or removed packages) and the new template version (which
upgraded others) changed ``/var/lib/dpkg/status``, neither file can simply win: the user's
packages would vanish from the database or the base's upgrades would be rolled back on paper
while their files are new. Per package (name and architecture):

* the user's stanza equals the new base's, or the user left it as the ancestor had it:
  the new base's stanza (upgrades, installs and removals by the base);
* only the user changed it: the user's stanza (their installs, removals, purges);
* both changed it differently: the new base's stanza, and a conflict is reported.

The result is written in dpkg's own order (by package name), so ``dpkg --audit`` reads it as
any status file. Pure text in, text out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deskpool.domain.layers import LayerError

StanzaKey = tuple[str, str]  # (package, architecture; "" when the stanza names none)


def parse_status(text: str, *, source: str = "dpkg status") -> dict[StanzaKey, str]:
    """Stanzas keyed by package and architecture; text normalised (no trailing spaces)."""
    stanzas: dict[StanzaKey, str] = {}
    for block in _blocks(text):
        fields = _fields(block)
        package = fields.get("package")
        if not package:
            raise LayerError(f"{source} has a stanza without a Package field: "
                             f"{block[0][:60]!r}")
        key = (package, fields.get("architecture", ""))
        if key in stanzas:
            raise LayerError(f"{source} lists package {package} ({key[1] or 'no arch'}) twice")
        stanzas[key] = "\n".join(block)
    return stanzas


def _blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if line:
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _fields(block: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in block:
        if line[0] in " \t" or ":" not in line:
            continue  # a continuation line of a multi-line field (Description, Conffiles)
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def stanza_field(stanza: str, name: str) -> str:
    return _fields(stanza.splitlines()).get(name.lower(), "")


def format_status(stanzas: dict[StanzaKey, str]) -> str:
    return "".join(stanzas[key] + "\n\n" for key in sorted(stanzas))


@dataclass(frozen=True)
class PackageConflict:
    package: str
    architecture: str
    user: str  # what the user had, e.g. "1.0-1 install ok installed" or "not installed"
    new: str  # what the new base has, in the same words


@dataclass
class StatusMerge:
    text: str
    from_user: set[str] = field(default_factory=set)  # package names whose user stanza won
    conflicts: list[PackageConflict] = field(default_factory=list)

    @property
    def conflicted(self) -> set[str]:
        return {c.package for c in self.conflicts}


def _describe(stanza: str | None) -> str:
    if stanza is None:
        return "not installed"
    version = stanza_field(stanza, "version") or "no version"
    return f"{version} ({stanza_field(stanza, 'status') or 'no status'})"


def merge_status(ancestor: str, user: str, new: str) -> StatusMerge:
    """Merge the user's status file and the new base's, against the base the user started on."""
    a = parse_status(ancestor, source="the old base's dpkg status")
    u = parse_status(user, source="the user's dpkg status")
    n = parse_status(new, source="the new base's dpkg status")
    merged: dict[StanzaKey, str] = {}
    result = StatusMerge(text="")
    for key in sorted(a.keys() | u.keys() | n.keys()):
        mine, base, theirs = u.get(key), a.get(key), n.get(key)
        if mine in (theirs, base):
            chosen = theirs
        elif theirs == base:
            chosen = mine
            result.from_user.add(key[0])
        else:
            chosen = theirs
            result.conflicts.append(PackageConflict(key[0], key[1], _describe(mine),
                                                    _describe(theirs)))
        if chosen is not None:
            merged[key] = chosen
    result.text = format_status(merged)
    return result
