#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite (pyproject's testpaths:
# fasthess' doctests and tests/) with the machine's defaults. Extra arguments go to pytest
# (scripts/test.sh -k hutchinson; paths run only those files; --torch-threads=N sets the intra-op threads).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$(scripts/bootstrap.sh | tail -n 1)
# CI builds the C++ extension: a build that silently failed must fail the tests.
export FASTHESS_REQUIRE_EXT="${FASTHESS_REQUIRE_EXT:-1}"
exec "$VPY" -m pytest -q --doctest-modules "$@"
