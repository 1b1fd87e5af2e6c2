"""deskpool: a VDI manager and connection broker on libvirt."""

__version__ = "0.1.0"
