#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/bench.sh, on a fresh Debian (as root):
# Debian packages — SIPp (sip-tester), Kamailio with app_python3, a compiler and Python headers,
# strace and iproute2/util-linux (the RFC 4475 run is confined to a loopback-only namespace and
# traced) — then ./.venv with callguard and the extras named in $1 (e.g. "test" or "bench").
set -euo pipefail
extras="$1"
export DEBIAN_FRONTEND=noninteractive
if ! command -v sipp >/dev/null || ! command -v kamailio >/dev/null \
   || ! command -v strace >/dev/null || ! command -v ip >/dev/null || ! command -v unshare >/dev/null \
   || [ ! -e /usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so ] || ! command -v gcc >/dev/null \
   || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get update -q
  apt-get install -y -q sip-tester kamailio kamailio-python3-modules python3-venv python3-dev gcc \
    strace iproute2 util-linux
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip "setuptools>=77"
.venv/bin/pip install -q ".[${extras}]"
