"""The environment stdio servers' package runners (npx, uvx) need as the service user.

npm and uv keep their caches, tool environments and downloaded Pythons under the home
directory. The service user's home is data_dir (the Ansible role and the image make it so),
but supervisord keeps its own HOME when it drops to that user, so every program gets HOME
and the XDG directories set to data_dir here: writable by the service user, kept across
restarts, and the same directories an operator's `runuser -u mcp-appliance -- npx …` uses.
The explicit cache variables equal the tools' defaults under that HOME, so a child started
with only HOME and PATH (the SDK's stdio client passes no more by default) uses the same
caches.

TLS: npm (Node.js) trusts its own bundled roots, uv the bundled webpki roots; a host
behind a TLS-inspecting proxy trusts its CA in the system bundle (update-ca-certificates),
so both are pointed at it.
"""

from __future__ import annotations

from pathlib import Path

#: Debian's system CA bundle (package ca-certificates, which the role and the image install).
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def runner_environment(data_dir: Path) -> dict[str, str]:
    """Variable -> value for npx and uvx run by the workers (and by the children they start)."""
    home = str(data_dir)
    return {
        "HOME": home,
        "XDG_CACHE_HOME": f"{home}/.cache",
        "XDG_CONFIG_HOME": f"{home}/.config",
        "XDG_DATA_HOME": f"{home}/.local/share",
        "XDG_STATE_HOME": f"{home}/.local/state",
        # npm's default cache under HOME; npx installs the packages it runs there (_npx/).
        "npm_config_cache": f"{home}/.npm",
        # No registry look-up for npm's own updates at every npx start (hosts may be offline).
        "npm_config_update_notifier": "false",
        "NODE_EXTRA_CA_CERTS": SYSTEM_CA_BUNDLE,
        "UV_CACHE_DIR": f"{home}/.cache/uv",
        "UV_TOOL_DIR": f"{home}/.local/share/uv/tools",
        "UV_PYTHON_INSTALL_DIR": f"{home}/.local/share/uv/python",
        # uv reads the system trust store (the bundle above) instead of its built-in roots.
        "UV_NATIVE_TLS": "true",
    }


def runner_path(bin_dir: str) -> str:
    """PATH for the programs as supervisord expands it: the appliance venv's bin (uvx) first,
    then the PATH supervisord was started with (node, npm and npx from /usr/bin)."""
    return f"{bin_dir}:%(ENV_PATH)s" if bin_dir else "%(ENV_PATH)s"
