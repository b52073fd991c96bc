#!/bin/sh
# Install discoveryd's systemd integration; the program itself must already be in
# the virtualenv /opt/discoveryd (README: "Install on a VM").
#
#   sudo systemd/install.sh            install, then `systemctl daemon-reload`
#   systemd/install.sh --root DIR      install under DIR only (packaging, tests)
#
# Installs the unit, the sysusers entry (and creates the user), the
# systemd-resolved drop-in example, and /etc/discoveryd/discoveryd.yaml unless one
# exists (root:discoveryd 0640: readable by the service, writable only by root).
# On systemd < 253 (no Type=notify-reload) a drop-in makes the unit Type=notify
# with ExecReload=kill -HUP.
set -eu

root=""
if [ "${1:-}" = "--root" ]; then
    root="${2:?--root needs a directory}"
fi
here="$(cd "$(dirname "$0")" && pwd)"

unitdir="$root/etc/systemd/system"
install -d -m 0755 "$unitdir" "$root/etc/sysusers.d" "$root/etc/systemd/resolved.conf.d"
install -m 0644 "$here/discoveryd.service" "$unitdir/discoveryd.service"
install -m 0644 "$here/discoveryd.sysusers" "$root/etc/sysusers.d/discoveryd.conf"
# Example only: copied beside resolved's drop-ins under a name resolved ignores.
install -m 0644 "$here/resolved-discoveryd.conf" "$root/etc/systemd/resolved.conf.d/discoveryd.conf.example"
# The unit's Documentation=.
if [ -f "$here/../README.md" ]; then
    install -D -m 0644 "$here/../README.md" "$root/opt/discoveryd/share/doc/discoveryd/README.md"
fi

version="$(systemctl --version 2>/dev/null | awk 'NR==1 {print $2}')"
case "$version" in
    '' | *[!0-9]*) version=0 ;;
esac
if [ "$version" -lt 253 ]; then
    install -d -m 0755 "$unitdir/discoveryd.service.d"
    cat > "$unitdir/discoveryd.service.d/10-before-systemd-253.conf" <<'DROPIN'
# systemd < 253 has no Type=notify-reload: readiness by READY=1, reload by SIGHUP.
[Service]
Type=notify
ExecReload=/bin/kill -HUP $MAINPID
DROPIN
fi

if [ -z "$root" ]; then
    systemd-sysusers /etc/sysusers.d/discoveryd.conf
    group=discoveryd
else
    group=0
fi
install -d -m 0750 -o 0 -g "$group" "$root/etc/discoveryd" "$root/etc/discoveryd/serviceentries"
if [ ! -e "$root/etc/discoveryd/discoveryd.yaml" ]; then
    install -m 0640 -o 0 -g "$group" "$here/discoveryd.yaml" "$root/etc/discoveryd/discoveryd.yaml"
fi
if [ -z "$root" ]; then
    systemctl daemon-reload
fi
echo "installed; start with: systemctl enable --now discoveryd"
