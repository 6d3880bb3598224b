#!/usr/bin/env bash
# Installs the benchmark peers from Debian: redis-server (Redis) and etcd-server (etcd).
# Idempotent and silent when both are already there; runs `apt-get update` before installing.
# Needs root (CI runs as root); without root and without the binaries it says what to run.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-peers: missing ${missing[*]}; run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
else
  SUDO=()
fi

echo "install-peers: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq >/dev/null
# --no-install-recommends: the packages' recommends (e.g. etcd-client) are not needed to bench.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Debian's packages start system services where an init system runs; the benchmark starts its
# own servers on free ports, so stop the system ones if they were started (harmless otherwise).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  "${SUDO[@]}" systemctl disable --now redis-server etcd >/dev/null 2>&1 || true
fi

for bin in redis-server etcd; do
  command -v "$bin" >/dev/null 2>&1 || { echo "install-peers: $bin still missing after apt-get" >&2; exit 1; }
done
echo "install-peers: $(redis-server --version | head -1)" >&2
echo "install-peers: $(etcd --version 2>/dev/null | head -1)" >&2
