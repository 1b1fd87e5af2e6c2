#!/bin/sh
# The cloudinit flavor's build step: run by image-setup.sh inside the image's chroot, before
# the kernel modules are pruned. cloud-init reads only the seed deskpool attaches
# (/etc/cloud/cloud.cfg.d/99-deskpool.cfg); nslcd is installed but off until a join hook
# configures it for a directory and starts it.
set -eu

log() { echo "image-setup: $*"; }

log "enabling cloud-init, leaving nslcd off until a join hook configures it"
systemctl enable cloud-init-local.service cloud-init.service cloud-config.service \
    cloud-final.service
systemctl disable nslcd.service
# The package's nslcd.conf names no directory of this deployment; a join hook writes its own.
# Nothing from the build may look like an instance already set up.
rm -rf /var/lib/cloud/instance /var/lib/cloud/instances /var/lib/cloud/data
mkdir -p /var/lib/deskpool
