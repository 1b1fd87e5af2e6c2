"""Fixtures shared by the functional tests of more than one module."""

from tests.functional.test_host_grid import grid  # noqa: F401  (the fake host grid)
