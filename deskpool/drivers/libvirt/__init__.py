"""The libvirt driver package: XML objects, the KVM probe and the driver itself."""

from deskpool.drivers.libvirt.driver import (
    LibvirtDriver,
    default_pool_name,
    forget_storage_pool,
)

__all__ = ["LibvirtDriver", "default_pool_name", "forget_storage_pool"]
