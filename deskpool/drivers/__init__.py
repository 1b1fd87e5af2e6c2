"""Hypervisor drivers: the contract (base), an in-memory fake and libvirt."""
