"""The three-way merge of dpkg's status file, package stanza by package stanza."""

from __future__ import annotations

import pytest

from deskpool.domain.dpkg_status import merge_status, parse_status, stanza_field
from deskpool.domain.layers import LayerError


def st(pkg: str, version: str, status: str = "install ok installed", arch: str = "amd64") -> str:
    return (f"Package: {pkg}\nStatus: {status}\nArchitecture: {arch}\nVersion: {version}\n"
            f"Description: {pkg}\n multi-line description\n .\n second paragraph\n")


def db(*stanzas: str) -> str:
    return "\n".join(stanzas)


def versions(text: str) -> dict[str, str]:
    return {k[0]: stanza_field(s, "version") for k, s in parse_status(text).items()}


def test_user_install_and_base_upgrade_both_survive() -> None:
    ancestor = db(st("libc6", "2.36-1"), st("vim", "9.0-1"))
    user = db(st("libc6", "2.36-1"), st("vim", "9.0-1"), st("hello", "2.10-3"))
    new = db(st("libc6", "2.36-9"), st("vim", "9.0-1"))
    merged = merge_status(ancestor, user, new)
    assert versions(merged.text) == {"libc6": "2.36-9", "vim": "9.0-1", "hello": "2.10-3"}
    assert merged.conflicts == [] and merged.from_user == {"hello"}


def test_package_changed_by_both_takes_the_new_base_and_is_reported() -> None:
    ancestor = db(st("openssl", "3.0.1"))
    user = db(st("openssl", "3.0.2"))
    new = db(st("openssl", "3.0.9"))
    merged = merge_status(ancestor, user, new)
    assert versions(merged.text) == {"openssl": "3.0.9"}
    [conflict] = merged.conflicts
    assert conflict.package == "openssl" and "3.0.2" in conflict.user and "3.0.9" in conflict.new
    assert merged.conflicted == {"openssl"}


def test_removals_by_either_side_and_identical_changes() -> None:
    ancestor = db(st("a", "1"), st("b", "1"), st("c", "1"), st("d", "1"))
    user = db(st("b", "1"), st("c", "2"), st("d", "1", "deinstall ok config-files"))
    new = db(st("a", "1"), st("c", "2"), st("d", "1"))  # base removed b, same upgrade of c
    merged = merge_status(ancestor, user, new)
    parsed = parse_status(merged.text)
    assert set(k[0] for k in parsed) == {"c", "d"}  # a removed by the user, b by the base
    assert "deinstall ok config-files" in parsed[("d", "amd64")]
    assert merged.conflicts == []


def test_user_removal_of_a_package_the_base_upgraded_is_a_conflict() -> None:
    merged = merge_status(db(st("a", "1")), "", db(st("a", "2")))
    assert versions(merged.text) == {"a": "2"}
    assert merged.conflicts[0].user == "not installed"


def test_architectures_are_separate_packages_and_output_is_sorted() -> None:
    ancestor = db(st("libfoo", "1", arch="amd64"))
    user = db(st("libfoo", "1", arch="amd64"), st("libfoo", "1", arch="i386"))
    new = db(st("zlib", "1"), st("libfoo", "2", arch="amd64"))
    merged = merge_status(ancestor, user, new)
    assert list(parse_status(merged.text)) == [("libfoo", "amd64"), ("libfoo", "i386"),
                                               ("zlib", "amd64")]
    assert merged.text.endswith("\n\n") and "\n\n\n" not in merged.text
    assert " multi-line description\n .\n" in merged.text  # continuation lines kept


def test_trailing_spaces_and_blank_lines_do_not_make_a_change() -> None:
    ancestor = db(st("a", "1"))
    user = "\n\n" + st("a", "1").replace("Version: 1", "Version: 1   ") + "\n\n"
    merged = merge_status(ancestor, user, db(st("a", "2")))
    assert merged.conflicts == [] and versions(merged.text) == {"a": "2"}


def test_malformed_status_is_a_clear_error() -> None:
    with pytest.raises(LayerError, match="user's dpkg status has a stanza without a Package"):
        merge_status("", "Status: install ok installed\n", "")
    with pytest.raises(LayerError, match=r"lists package a .amd64. twice"):
        merge_status(db(st("a", "1"), st("a", "2")), "", "")
