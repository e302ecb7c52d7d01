#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian (as root) and run the whole suite.
# Debian packages: SIPp (sip-tester), Kamailio with app_python3, a compiler and Python headers,
# strace and iproute2/util-linux (the RFC 4475 run is confined to a loopback-only namespace and traced).
# Python packages come from PyPI into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

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
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q '.[test]'

# The tests run against the installed package, not the source tree.
cd tests/..
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
