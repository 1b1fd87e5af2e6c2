#!/usr/bin/env bash
# Makes sure virtlogd and libvirtd run and qemu:///system answers.
# Uses systemd where it is PID 1; otherwise starts the daemons directly (containers, CI sandboxes).
# --restart: restart libvirtd first (after its configuration changed).
set -euo pipefail

log() { printf '[libvirtd-up] %s\n' "$*" >&2; }

restart=0
[ "${1:-}" = "--restart" ] && restart=1

if [ -d /run/systemd/system ]; then
  if [ $restart = 1 ]; then systemctl restart libvirtd; fi
  systemctl start virtlogd libvirtd
else
  if [ $restart = 1 ] && pgrep -x libvirtd >/dev/null; then
    log "restarting libvirtd"
    pkill -x libvirtd || true
    for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
  fi
  pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; virtlogd -d; }
  if ! pgrep -x libvirtd >/dev/null; then
    log "starting libvirtd"
    rm -f /run/libvirt/libvirt-sock /run/libvirtd.pid
    libvirtd -d
  fi
fi

# The first connection probes QEMU's capabilities (~10 s); wait for the socket to answer.
for _ in $(seq 120); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.5
done
echo "libvirtd-up.sh: qemu:///system did not answer within 60 s (see /var/log/libvirt/)" >&2
exit 1
