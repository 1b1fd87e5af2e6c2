"""Desktop identity (the guest wire format) and naming patterns."""

from __future__ import annotations

import uuid

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.naming import first_free_number, render, validate_pattern


def test_identity_round_trips_through_guest_text() -> None:
    identity = DesktopIdentity(uuid.uuid4(), "lab-007", new_mac(), new_machine_id())
    text = identity.to_guest_text()
    assert text.startswith("deskpool-identity=1\n")
    assert DesktopIdentity.from_guest_text(text) == identity


def test_generated_macs_and_machine_ids_are_valid_and_distinct() -> None:
    macs = {new_mac() for _ in range(200)}
    ids = {new_machine_id() for _ in range(200)}
    assert len(macs) == 200 and len(ids) == 200
    assert all(m.startswith("52:54:00:") for m in macs)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hostname", "Bad_Name", "hostname"),
    ("hostname", "-lead", "hostname"),
    ("mac", "52:54:00:zz:00:00", "MAC"),
    ("machine_id", "1234", "machine-id"),
])
def test_bad_identity_fields_are_named(field: str, value: str, message: str) -> None:
    fields = {"desktop_id": uuid.uuid4(), "hostname": "ok", "mac": "52:54:00:00:00:01",
              "machine_id": "a" * 32, field: value}
    with pytest.raises(InvalidInput, match=message):
        DesktopIdentity(**fields)  # type: ignore[arg-type]


def test_guest_text_without_tag_or_field_is_refused() -> None:
    with pytest.raises(InvalidInput, match="tag"):
        DesktopIdentity.from_guest_text("hostname=x\n")
    with pytest.raises(InvalidInput, match="missing"):
        DesktopIdentity.from_guest_text("deskpool-identity=1\nhostname=x\n")


def test_pattern_renders_and_finds_first_gap() -> None:
    validate_pattern("lab-{n:03}")
    assert render("lab-{n:03}", 7) == "lab-007"
    assert first_free_number("lab-{n:03}", {"lab-001", "lab-002", "lab-004"}) == 3


@pytest.mark.parametrize("pattern", ["lab", "lab-{m}", "{n}-{n}", "LAB-{n}", "lab-{n:q}"])
def test_bad_patterns_are_refused_with_the_pattern_named(pattern: str) -> None:
    with pytest.raises(InvalidInput, match="naming pattern"):
        validate_pattern(pattern)


def test_new_mac_never_returns_a_taken_one() -> None:
    taken: set[str] = set()
    for _ in range(5000):
        mac = new_mac(taken)
        assert mac not in taken
        taken.add(mac)
    assert len(taken) == 5000
