#!/usr/bin/env bash
# Set up everything the test suite needs on Debian 12, then run all of it.
# Needs root: it installs Debian packages, creates the service user and boots a
# throw-away Debian host with systemd-nspawn for the deploy test.
#   sudo bash scripts/test.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run as root (sudo bash scripts/test.sh): it installs packages and boots a test host" >&2
    exit 2
fi

TEST_VENV=${MCP_TEST_VENV:-/opt/mcp-appliance-test}
export MCP_TOOLS_VENV=${MCP_TOOLS_VENV:-/opt/mcp-appliance-tools}

echo "== Debian packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    nginx-light wrk python3 python3-venv python3-pip ca-certificates curl \
    debootstrap systemd-container iproute2 util-linux tini shellcheck openssl postgresql >/dev/null

# The appliance runs nginx itself (under supervisord); Debian's own nginx service is not ours to use.
getent passwd mcp-appliance >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin mcp-appliance

echo "== test venv ($TEST_VENV, Debian's python3 so the service user can run it)"
[ -x "$TEST_VENV/bin/python" ] || /usr/bin/python3 -m venv "$TEST_VENV"
"$TEST_VENV/bin/pip" install -q --upgrade pip
"$TEST_VENV/bin/pip" install -q ".[test]"

echo "== third-party MCP servers for the stdio bridge tests (tests/third_party.py finds them here)"
# Debian's nodejs and npm unless a Node.js with its own npm is there already (NodeSource's
# nodejs bundles npm and conflicts with Debian's npm package).
command -v npm >/dev/null || apt-get install -y -q --no-install-recommends nodejs npm >/dev/null
npm install --prefix "$TEST_VENV/npm" --no-audit --no-fund --loglevel=error \
    @modelcontextprotocol/server-everything @modelcontextprotocol/server-filesystem \
    supergateway >/dev/null
# mcp-server-time pins its own mcp: a venv of its own.
[ -x "$TEST_VENV/time-venv/bin/python" ] || /usr/bin/python3 -m venv "$TEST_VENV/time-venv"
"$TEST_VENV/time-venv/bin/pip" install -q mcp-server-time
# fastmcp's proxy, which bench/stdio.py measures next to the bridge: a venv of its own (not ours to depend on).
[ -x "$TEST_VENV/fastmcp-venv/bin/python" ] || /usr/bin/python3 -m venv "$TEST_VENV/fastmcp-venv"
"$TEST_VENV/fastmcp-venv/bin/pip" install -q "fastmcp>=4.2,<5"

echo "== tool venv ($MCP_TOOLS_VENV: ansible, linters, schema validators)"
[ -x "$MCP_TOOLS_VENV/bin/python" ] || /usr/bin/python3 -m venv "$MCP_TOOLS_VENV"
"$MCP_TOOLS_VENV/bin/pip" install -q -r tests/tools-requirements.txt

echo "== tests"
# Run from a copy-free checkout: the workers import the installed package, the tests this tree.
exec "$TEST_VENV/bin/python" -m pytest -p no:cacheprovider -ra --durations=15 "$@"
