#!/usr/bin/env bash
# Installs deskpool's systemd unit (deploy/deskpool.service, pointed at this clone's .venv) and,
# when missing, /etc/deskpool/deskpool.toml from the example (every setting commented out).
# Neither enables nor starts the service. --root DIR installs under DIR instead of / (tests).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
root=/
if [ "${1:-}" = --root ]; then
  root=${2:?--root needs a directory}
fi
log() { printf '[setup] %s\n' "$*" >&2; }

unit_dir="$root/etc/systemd/system"
conf_dir="$root/etc/deskpool"
mkdir -p "$unit_dir" "$conf_dir"
chmod 0750 "$conf_dir"
# The broker, and deskpool's own Samba server for redirected folders.
for unit in deskpool deskpool-smbd; do
  rendered=$(sed "s|@REPO@|$repo|g" "$repo/deploy/$unit.service")
  if [ "$(cat "$unit_dir/$unit.service" 2>/dev/null)" != "$rendered" ]; then
    log "installing $unit_dir/$unit.service (not enabled: systemctl enable --now $unit)"
    printf '%s\n' "$rendered" >"$unit_dir/$unit.service"
    chmod 0644 "$unit_dir/$unit.service"
    changed=1
  fi
done
if [ ! -e "$conf_dir/deskpool.toml" ]; then
  log "installing $conf_dir/deskpool.toml (the example: every setting commented out)"
  install -m 0640 "$repo/deploy/deskpool.toml.example" "$conf_dir/deskpool.toml"
fi
if [ -n "${changed:-}" ] && [ "$root" = / ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
