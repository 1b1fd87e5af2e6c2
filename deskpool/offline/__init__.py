"""Offline desktops (issue 15), the laptop's side: what the ``deskpool offline`` client will
build on. Pure functions over libvirt XML and the pool's offline policy; no libvirt calls."""
