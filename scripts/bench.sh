#!/usr/bin/env bash
# Install what the load bench needs on a fresh Debian (as root) and run it against callguard serve,
# Kamailio + the plug-in and Kamailio's native anchor. Extra arguments go to bench/load.py
# (e.g. --quick); results land in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh bench
exec .venv/bin/python bench/load.py "$@"
