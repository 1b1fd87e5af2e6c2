#!/usr/bin/env bash
# Installs and configures everything deskpool needs on a Debian 12 machine, as root.
# Idempotent: every step checks before it acts, so running it again is cheap.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup-host.sh: must run as root (it installs Debian packages and configures libvirt)" >&2
  exit 2
fi

# --- Debian packages -----------------------------------------------------------------------
packages=(
  libvirt-daemon-system libvirt-clients libvirt-dev libvirt-daemon-driver-qemu
  qemu-system-x86 qemu-utils ovmf
  mmdebstrap e2fsprogs dosfstools mtools
  pkg-config gcc python3-dev python3-venv
  ca-certificates
  slapd ldap-utils novnc chromium fonts-dejavu-core postgresql
  # native clients, run by the tests as users run them: remote-viewer (SPICE), xfreerdp (RDP)
  virt-viewer freerdp2-x11 xvfb xauth imagemagick x11-utils
  # the copy-based profile P5 compares with (bench/p5_profile.py)
  rsync
  # folder redirection: deskpool's own Samba server, smbclient for its tests, mount.cifs
  samba smbclient cifs-utils
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the user libvirt 9.0 looks up before reading qemu.conf --------------------------------
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home -g libvirt-qemu libvirt-qemu

# --- qemu.conf: QEMU runs as root with no security driver, so it can read images under the
# deskpool data directory and /tmp-based test directories without relabelling.
conf=/etc/libvirt/qemu.conf
marker="# deskpool settings (scripts/setup-host.sh)"
if ! grep -qF "$marker" "$conf"; then
  log "configuring $conf"
  cat >>"$conf" <<EOF

$marker
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
EOF
  restart_libvirt=1
fi

# --- daemons: systemd when it runs, else started by hand ------------------------------------
"$here/libvirtd-up.sh" ${restart_libvirt:+--restart}

# --- deskpool's Samba server (folder redirection) ---------------------------------------------
# Debian's samba package starts its own smbd on /etc/samba/smb.conf, which would hold port 445;
# deskpool serves its own configuration (deploy/deskpool-smbd.service, or `deskpool fileshare
# setup --start` without systemd). Debian's is stopped only when its config is still the
# package's (nothing of the admin's is served by it).
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet smbd.service 2>/dev/null \
    && cmp -s /etc/samba/smb.conf /usr/share/samba/smb.conf; then
  log "stopping Debian's default smbd (deskpool runs its own: deskpool-smbd.service)"
  systemctl disable --now smbd.service nmbd.service >/dev/null 2>&1 || true
fi

# --- Python virtualenv with the package and its dev tools -----------------------------------
"$here/setup-venv.sh"

# --- deskpool's own service, where systemd runs: installed, not enabled nor started ----------
if [ -d /run/systemd/system ]; then
  "$here/install-service.sh"
fi
log "host ready"
