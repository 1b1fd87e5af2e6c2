#!/bin/sh
# The desktop flavor's build step: run by image-setup.sh inside the image's chroot, before the
# kernel modules are pruned. Boots to LightDM's greeter on the graphical target.
set -eu

log() { echo "image-setup: $*"; }

log "enabling the display manager"
systemctl set-default graphical.target
# lightdm's own postinst makes the display-manager.service alias; be explicit about it.
systemctl enable lightdm.service
ln -sf /lib/systemd/system/lightdm.service /etc/systemd/system/display-manager.service
echo /usr/sbin/lightdm >/etc/X11/default-display-manager
# logind asks for the DRM core before it looks for seats (image-setup.sh masks it for the
# console flavor, which has no GPU driver).
systemctl unmask modprobe@drm.service

# xrdp's RSA keys and TLS certificate made by its postinst would be shared by every clone of
# the image: drop them, each desktop makes its own on first boot (deskpool-xrdp-keys).
log "removing the image's own xrdp keys"
rm -f /etc/xrdp/rsakeys.ini /etc/xrdp/cert.pem /etc/xrdp/key.pem \
    /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
systemctl enable deskpool-xrdp-keys.service xrdp.service

# An RDP client that signs in with the one-time password goes straight to an Xorg session
# (xorgxrdp), the user's Xfce through deskpool's /etc/xrdp/startwm.sh, on a bus of its own.
log "xrdp: the Xorg session for clients that sign in"
sed -i 's/^autorun=.*/autorun=Xorg/' /etc/xrdp/xrdp.ini
grep -q '^autorun=Xorg$' /etc/xrdp/xrdp.ini
