"""Session routing between nodes (Kubernetes pods, or fixed hosts): what nginx needs to know.

A legacy session id names its owner node (`n<node>w<worker>-…`, see
`appliance.gate.sessions.owner_prefix`). A request for another node's session is proxied
once to that node's nginx, marked with FORWARDED_HEADER; a marked request is never
forwarded again. Peer names are looked up in DNS per request (a variable in
`proxy_pass`), so pods that do not exist yet do not stop nginx from starting.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from appliance.config import ConfigError, Settings, split_address

#: Marks a request one node forwarded to another; its value names the forwarding node.
FORWARDED_HEADER = "X-MCP-Appliance-Forwarded"
RESOLV_CONF = Path("/etc/resolv.conf")


def read_nameservers(path: Path = RESOLV_CONF) -> tuple[str, ...]:
    """The `nameserver` addresses of a resolv.conf that nginx can use (none when it is missing)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ()
    found = []
    for line in lines:
        parts = line.split()
        # A link-local IPv6 server with a zone ("fe80::1%eth0") is not an address nginx accepts.
        if len(parts) >= 2 and parts[0] == "nameserver" and "%" not in parts[1] and _is_ip(parts[1]):
            found.append(parts[1])
    return tuple(found)


def peer_routes(settings: Settings) -> list[dict[str, str]]:
    """Entries of nginx's session map for sessions that other nodes own ([] for a lone node)."""
    node = settings.node
    if not node.peers and not node.peer_address:
        return []
    # A session tagged with this node but no worker it has: the pool answers 404 for it.
    routes = [{"pattern": rf"~^n{node.ordinal}w", "target": "mcp_pool"}]
    if node.peer_address:
        routes.append({"pattern": r"~^n(?<mcp_peer_ordinal>\d+)w\d+-",
                       "target": node.peer_address.replace("{ordinal}", "${mcp_peer_ordinal}")})
    else:
        routes += [{"pattern": rf"~^n{k}w\d+-", "target": address}
                   for k, address in enumerate(node.peers) if k != node.ordinal]
    return routes


def nginx_resolver(settings: Settings, nameservers: tuple[str, ...]) -> str:
    """The addresses for nginx's `resolver`, or "" when every peer is an IP address."""
    node = settings.node
    peer_hosts = [split_address(peer)[0] for peer in node.peers]  # type: ignore[index]
    if not node.peer_address and all(_is_ip(host) for host in peer_hosts):
        return ""
    servers = node.resolver or nameservers
    if not servers:
        raise ConfigError(f"{settings.source}: peers are found by DNS name but there is no DNS server: "
                          "set node.resolver or add a nameserver to /etc/resolv.conf")
    return " ".join(f"[{s}]" if ":" in s and not s.startswith("[") and _is_ip(s) else s for s in servers)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
