"""The in-memory fake hypervisor package: the driver, its VMs' state and guests, saved memory
states, fault injection, and a server that shares fake hosts between processes."""

from deskpool.drivers.fake.driver import FakeDriver

__all__ = ["FakeDriver"]
