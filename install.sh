#!/usr/bin/env bash
# Install and start mcp-appliance on this Debian 12 machine, with the default notes server.
# It runs the project's own Ansible role against localhost, so a single host and a
# fleet are installed the same way:  sudo ./install.sh [-e mcp_appliance_http_port=8080 …]
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo ./install.sh)" >&2
    exit 2
fi

TOOLS=${MCP_TOOLS_VENV:-/opt/mcp-appliance-tools}
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ca-certificates >/dev/null
[ -x "$TOOLS/bin/python" ] || /usr/bin/python3 -m venv "$TOOLS"
"$TOOLS/bin/pip" install -q "ansible-core>=2.16"

"$TOOLS/bin/ansible-playbook" -i ansible/inventory.local ansible/site.yml "$@"

# The next steps, as README.md ("The two commands") gives them for the role's defaults.
cat <<'MSG'

mcp-appliance is running (production mode: every MCP call needs an API key; none exists yet).
Next steps, as in README.md:
    curl localhost/health
    supervisorctl status
    systemctl status mcp-appliance
    sudo mcp-appliance keys add --principal my-agent --scope notes:write   # prints an API key once
Then point an MCP client at http://<this host>/mcp with "Authorization: Bearer <key>"
(README.md shows the same calls with curl). Workers pick up new keys within a second.
Settings: run ./install.sh again with -e mcp_appliance_...=... (it rewrites
/etc/mcp-appliance/appliance.toml and reloads the service: systemctl reload mcp-appliance).
MSG
