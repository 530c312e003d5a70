"""Peer settings and what nginx gets from them: ordinals from host names, peer addresses, resolvers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, NodeSettings, Settings, load_settings
from appliance.peers import nginx_resolver, peer_routes, read_nameservers
from tests.harness import to_toml


def load(tmp_path: Path, node: dict[str, Any], hostname: str = "vm") -> Settings:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"node": node}))
    return load_settings(path, {}, hostname=hostname)


def with_node(**node: Any) -> Settings:
    return dataclasses.replace(Settings(), node=NodeSettings(**node))


@pytest.mark.parametrize(("hostname", "ordinal"), [("mcp-appliance-7", 7), ("web-0", 0),
                                                    ("app-12.app-peers.team.svc.cluster.local", 12)])
def test_ordinal_minus_one_takes_the_number_that_ends_the_host_name(tmp_path: Path, hostname: str, ordinal: int) -> None:
    assert load(tmp_path, {"ordinal": -1}, hostname).node.ordinal == ordinal


def test_the_host_name_is_not_read_for_an_explicit_ordinal(tmp_path: Path) -> None:
    assert load(tmp_path, {"ordinal": 4}, hostname="no-number-here").node.ordinal == 4


def test_a_host_name_without_an_ordinal_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'node.ordinal' = -1 .* host name 'laptop' does not end in -<ordinal>"):
        load(tmp_path, {"ordinal": -1}, hostname="laptop")


@pytest.mark.parametrize(("node", "key"), [
    ({"peers": ["10.0.0.1"]}, "node.peers[0]"),
    ({"peers": ["10.0.0.1:80", "::1:80"]}, "node.peers[1]"),
    ({"peers": ["under_score:80"]}, "node.peers[0]"),
    ({"peer_address": "app.peers:8080"}, "node.peer_address"),
    ({"peer_address": "app-{ordinal}-{ordinal}.peers:8080"}, "node.peer_address"),
    ({"peer_address": "app-{ordinal}.peers"}, "node.peer_address"),
    ({"peer_address": "app-{ordinal}.{namespace}:8080"}, "node.peer_address"),
    ({"peer_address": "app-{ordinal}.peers:8080", "peers": ["10.0.0.1:80"]}, "node.peer_address"),
    ({"resolver": ["dns.example"]}, "node.resolver[0]"),
    ({"ordinal": -2}, "node.ordinal"),
])
def test_bad_peer_settings_name_the_key(tmp_path: Path, node: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load(tmp_path, node)


def test_nameservers_are_read_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# kube-dns\nsearch ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n"
                    "nameserver fd00::a\nnameserver fe80::1%eth0\noptions ndots:5\n")
    assert read_nameservers(conf) == ("10.96.0.10", "fd00::a")
    assert read_nameservers(tmp_path / "missing") == ()


def test_a_resolver_is_rendered_only_when_peers_have_names() -> None:
    assert nginx_resolver(Settings(), ("10.96.0.10",)) == ""
    assert nginx_resolver(with_node(peers=("10.0.0.1:80", "[fd00::2]:80")), ("10.96.0.10",)) == ""
    assert nginx_resolver(with_node(peers=("10.0.0.1:80", "vm-1.internal:80")), ("10.96.0.10", "fd00::a")) == "10.96.0.10 [fd00::a]"
    template = with_node(peer_address="app-{ordinal}.peers:8080")
    assert nginx_resolver(template, ("10.96.0.10",)) == "10.96.0.10"
    configured = with_node(peer_address="app-{ordinal}.peers:8080", resolver=("127.0.0.1:5353",))
    assert nginx_resolver(configured, ("10.96.0.10",)) == "127.0.0.1:5353"
    with pytest.raises(ConfigError, match="set node.resolver"):
        nginx_resolver(template, ())


def test_peer_routes_skip_this_node_and_send_its_unknown_workers_to_the_pool() -> None:
    assert peer_routes(Settings()) == []
    routes = peer_routes(with_node(ordinal=1, peers=("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")))
    assert routes == [{"pattern": "~^n1w", "target": "mcp_pool"},
                      {"pattern": r"~^n0w\d+-", "target": "10.0.0.1:80"},
                      {"pattern": r"~^n2w\d+-", "target": "10.0.0.3:80"}]
    (own, peer) = peer_routes(with_node(ordinal=0, peer_address="app-{ordinal}.peers.ns.svc.cluster.local:8080"))
    assert own == {"pattern": "~^n0w", "target": "mcp_pool"}
    assert peer["target"] == "app-${mcp_peer_ordinal}.peers.ns.svc.cluster.local:8080"
    assert "(?<mcp_peer_ordinal>" in peer["pattern"]
