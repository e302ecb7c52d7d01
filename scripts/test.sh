#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian (as root) and run the whole suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
# The tests run against the installed package in .venv, not the source tree.
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
