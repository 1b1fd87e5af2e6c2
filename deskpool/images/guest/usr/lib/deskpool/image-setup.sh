#!/bin/sh
# Runs once while the image is built, inside its chroot (an mmdebstrap customize hook), after
# the other guest files are in place. Kept in the image as a record of how it was made.
set -eu

log() { echo "image-setup: $*"; }

# Identity defaults; the deskpool-identity hook replaces them at boot.
echo deskpool >/etc/hostname
cat >/etc/hosts <<'EOF'
127.0.0.1	localhost
127.0.1.1	deskpool
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
# Empty (not missing, not "uninitialized"): systemd uses a transient id and treats the boot
# as a normal one (no first-boot presets), and the identity hook writes the real id.
: >/etc/machine-id
chmod 0444 /etc/machine-id
rm -f /var/lib/dbus/machine-id

# Root stays locked: access is through the guest agent (and the console login for users
# the template adds).
usermod -p '!' root

log "enabling units"
systemctl enable deskpool-identity.service qemu-guest-agent.service
systemctl enable getty@tty1.service
# Nothing in an ephemeral desktop clone should wake up to update or scrub by itself.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer systemd-pstore.service; do
    if [ -e "/lib/systemd/system/$unit" ]; then systemctl disable "$unit" 2>/dev/null || true; fi
done
# Early-boot work this guest never needs: under TCG every fork competes with the guest agent
# for the one vCPU. (The modules these would load are pruned below anyway.)
systemctl mask modprobe@drm.service modprobe@fuse.service modprobe@loop.service \
    modprobe@dm_mod.service modprobe@configfs.service sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-kernel-config.mount dev-hugepages.mount \
    proc-sys-fs-binfmt_misc.automount
mkdir -p /etc/systemd/system-generators
for gen in systemd-gpt-auto-generator systemd-hibernate-resume-generator \
    systemd-integritysetup-generator systemd-veritysetup-generator \
    systemd-cryptsetup-generator systemd-system-update-generator systemd-run-generator \
    systemd-rc-local-generator systemd-sysv-generator; do
    ln -sf /dev/null "/etc/systemd/system-generators/$gen"
done

# The flavor's own steps (desktop: the display manager, the graphical target).
if [ -e /usr/lib/deskpool/flavor-setup.sh ]; then
    log "setting up the ${DESKPOOL_FLAVOR:-console} flavor"
    /bin/sh /usr/lib/deskpool/flavor-setup.sh
fi
echo "${DESKPOOL_FLAVOR:-console}" >/usr/lib/deskpool/flavor

log "pruning kernel modules"
for kdir in /lib/modules/*; do
    kver=${kdir##*/}
    # shellcheck disable=SC2086 # a list of module paths, split on purpose
    /bin/sh /usr/lib/deskpool/prune-modules "$kdir" ${DESKPOOL_KEEP_MODULES:-}
    depmod -a "$kver"
    # The modules the flavor needs must still load: their files and those they depend on.
    for module in ${DESKPOOL_REQUIRED_MODULES:-}; do
        deps=$(modprobe -S "$kver" --show-depends "$module") || {
            echo "image-setup: module $module is missing after pruning" >&2
            exit 1
        }
        for file in $(printf '%s\n' "$deps" | awk '$1 == "insmod" {print $2}'); do
            [ -f "$file" ] || { echo "image-setup: $module needs $file, pruned" >&2; exit 1; }
        done
    done
    log "building the initramfs for $kver"
    update-initramfs -u -k "$kver"
done

log "pruning documentation and locales"
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
find /usr/share/doc -depth -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*
rm -rf /var/cache/apt/* /var/lib/apt/lists/* /var/log/*.log /var/log/apt/*
# Every clone must gather its own entropy rather than share one seed.
rm -f /var/lib/systemd/random-seed
# Mark /etc and /var as up to date with /usr (what systemd-update-done would write), so
# ConditionNeedsUpdate= units such as systemd-sysusers skip every clone's first boot.
usr_ns=$(stat -c %.9Y /usr | tr -d .)
for dir in /etc /var; do
    printf '# Written by deskpool image-setup.sh, as systemd-update-done would.\nTIMESTAMP_NSEC=%s\n' \
        "$usr_ns" >"$dir/.updated"
    touch -r /usr "$dir/.updated"
done
log "done"
