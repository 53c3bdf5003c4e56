#!/usr/bin/env bash
# Installs Prometheus (Debian's `prometheus` package) for the integration tests, unless a
# `prometheus` binary is already on PATH. Safe to run again. The tests start their own server
# on a free port; the system service the package may start (port 9090) is stopped and disabled.
# Where nothing can be installed (no apt-get, no root, no password-less sudo) it only warns:
# the tests that need Prometheus then skip and say why.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

warn() {
    echo "install-prometheus: $*; the Prometheus integration tests will be skipped" >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || warn "no apt-get here (install Prometheus yourself)"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    warn "root or password-less sudo is needed to run apt-get"
fi

"${SUDO[@]}" apt-get update -qq || warn "apt-get update failed"
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null || warn "apt-get could not install prometheus"

# Do not leave a system service holding port 9090 behind.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
    "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1; then
        "${SUDO[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
fi

command -v prometheus >/dev/null 2>&1 || warn "apt-get finished but prometheus is not on PATH"
echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
