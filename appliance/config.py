"""The one settings object: `appliance.toml` plus environment overrides, validated once.

Everything the appliance does is derived from a `Settings` value produced by
`load_settings`. Nothing else in the package reads the environment or the TOML file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import __version__
from appliance.uris import canonical_uri

DEFAULT_CONFIG_PATH = Path("/etc/mcp-appliance/appliance.toml")
ENV_PREFIX = "MCP_APPLIANCE_"
#: Environment variables that the appliance itself sets or reads outside the key mapping.
ENV_RESERVED = frozenset({"MCP_APPLIANCE_CONFIG"})

Environment = Literal["development", "staging", "production"]
LogLevel = Literal["debug", "info", "warning", "error"]
JsonResponse = Literal["auto", True, False]


class ConfigError(Exception):
    """An operator mistake in the configuration; the message names the key."""


@dataclass(frozen=True)
class HttpSettings:
    """The public listener: nginx."""

    #: Address nginx listens on ("0.0.0.0" all IPv4, "::" all IPv6 and IPv4).
    host: str = "0.0.0.0"
    #: The public port; below 1024 needs root or CAP_NET_BIND_SERVICE.
    port: int = 80
    #: Largest request body nginx accepts, in bytes (413 beyond it).
    max_body_bytes: int = 4 * 1024 * 1024
    #: How long nginx waits for a worker's answer or the next SSE event, in seconds.
    read_timeout: int = 3600
    #: Seconds nginx waits to connect to a worker before trying the next one.
    connect_timeout: int = 2
    #: Idle keepalive connections nginx keeps to each worker.
    upstream_keepalive: int = 64
    #: Connections each nginx worker process may hold (clients plus upstreams: an open SSE stream
    #: holds two). Sized for one process per 4 CPUs (nginx_workers): a 2-core host holds ~8,000 streams.
    worker_connections: int = 16384
    #: nginx worker processes; 0: one per 4 CPUs the appliance may use (its cgroup's CPU quota, else
    #: the machine's count), at least one. Proxying a call costs nginx about a tenth of what the
    #: call costs a worker, so one nginx process keeps up with 4 cores of workers, and fewer
    #: processes contend for the cores (bench/RESULTS.md).
    nginx_workers: int = 0
    #: Load balancers / proxies (CIDR) whose X-Forwarded-For nginx believes: the real client
    #: address then drives per-address limits and audit records. Empty: trust nobody. List only
    #: the proxies themselves (your load balancer, your Ingress controller's pods), never a network
    #: where clients live: any host in it can name any client address (limits, audit trail).
    #: limits.exempt and the internal endpoints look at the connecting address, not this one.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkersSettings:
    """The MCP worker processes (hypercorn, loopback only)."""

    #: How many MCP worker processes (one per core is a good start).
    count: int = 2
    #: Loopback address the workers listen on.
    host: str = "127.0.0.1"
    #: Worker K listens on base_port + K.
    base_port: int = 9100
    #: Seconds a stopping worker gives in-flight requests before it is killed.
    graceful_timeout: int = 20
    #: Seconds a worker may stay alive but unanswering (a blocked event loop, a deadlock, a stopped
    #: process) before the watchdog restarts it (SIGTERM, then SIGKILL); it leaves nginx's pool
    #: after about 1.5 s without an answer and returns when it answers again. A stdio server's child that
    #: answers no ping for as long is restarted too.
    hang_timeout: float = 30.0
    #: Seconds nginx waits for a worker's answer to a read (a 2026-07-28 request whose Mcp-Method is
    #: tools/list, resources/read, prompts/get, ping, …) before it sends the read to another worker.
    read_timeout: int = 10


@dataclass(frozen=True)
class AdminSettings:
    """The admin and health app (Starlette on hypercorn, loopback only)."""

    #: Loopback address of the admin app.
    host: str = "127.0.0.1"
    #: Loopback port of the admin app (reached through nginx).
    port: int = 9000
    #: File holding the admin token that /admin/* (and /config in production) require;
    #: empty: `run` generates a fresh one at <run_dir>/admin.token for each start.
    token_file: str = ""


@dataclass(frozen=True)
class McpSettings:
    """The hosted MCP app and its transport."""

    #: `module:attribute` naming an MCPServer or any Streamable HTTP ASGI app.
    app: str = "appliance.servers.notes:server"
    #: URL path of the MCP endpoint.
    path: str = "/mcp"
    #: Legacy (2025-11-25 and earlier) sessions; false makes the legacy era stateless.
    sessions: bool = True
    #: How POSTs are answered: true, one JSON body (a call's progress and log messages are dropped);
    #: false, an SSE stream; "auto", one JSON body for each 2026-07-28 request that asks for nothing to
    #: be streamed (no progressToken or log level in params._meta, not subscriptions/listen) and a stream
    #: for every other request (legacy ones always). "auto" applies to an MCPServer; another app gets false.
    json_response: JsonResponse = "auto"
    #: Seconds without a request after which a legacy session is closed (then 404).
    session_idle_timeout: int = 1800
    #: Open legacy sessions per worker; beyond it a new session gets 503.
    max_sessions: int = 10000
    #: Open legacy sessions per worker that one principal (with auth.mode "none": one client
    #: address) may hold; beyond it its new session gets 429, and other callers still get theirs.
    #: Clients in limits.exempt are not held to it. Above mcp.max_sessions it changes nothing.
    max_sessions_per_principal: int = 1000
    #: Body limit enforced inside the worker (nginx enforces http.max_body_bytes first).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Host header values allowed (DNS-rebinding protection); "*" allows any,
    #: "name:*" any port of a name. A bad Host gets 421.
    allowed_hosts: tuple[str, ...] = ("*",)
    #: Origin header values allowed besides same-origin ones (the origin of the Host a request was sent
    #: to, when that Host is an IP address, localhost or listed in allowed_hosts); requests without
    #: Origin always pass. A bad Origin gets 403.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSettings:
    """How the admin app judges readiness."""

    #: Workers that must answer their probe for /health/ready to be 200.
    min_ready_workers: int = 1
    #: Seconds the admin app waits for a worker's probe answer.
    probe_timeout: float = 1.0


#: node.ordinal value that means "the ordinal at the end of the host name".
ORDINAL_FROM_HOSTNAME = -1


@dataclass(frozen=True)
class NodeSettings:
    """This host's place among peers (a StatefulSet pod ordinal on Kubernetes)."""

    #: This node's number among peers (tags its session ids); -1: the number that ends the host
    #: name `<name>-<ordinal>` (what a StatefulSet pod is called).
    ordinal: int = 0
    #: Peers' public addresses "host:port", entry K being node K (this node's own entry is not used):
    #: a session owned by node K is proxied to it. For fixed sets of hosts; see peer_address for pods.
    peers: tuple[str, ...] = ()
    #: Peer address template with "{ordinal}", looked up in DNS per request (pods that do not exist
    #: yet are fine), e.g. "mcp-appliance-{ordinal}.mcp-appliance-peers.default.svc.cluster.local:8080".
    peer_address: str = ""
    #: DNS servers ("ip" or "ip:port") nginx asks for peer names; empty: the nameservers in /etc/resolv.conf.
    resolver: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the MCP endpoint."""

    #: "none" (every caller is the principal `anonymous`), "api_keys" (auth.keys_file) or
    #: "jwt" (bearer tokens signed by your identity provider).
    mode: Literal["none", "api_keys", "jwt"] = "none"
    #: Mode "none" is refused when environment = "production" unless this is true.
    allow_none_in_production: bool = False
    #: Scopes of `anonymous` in mode "none"; "*" stands for every scope (no policy refusal).
    anonymous_scopes: tuple[str, ...] = ("*",)
    #: Header that may carry an API key instead of `Authorization: Bearer <key>`.
    api_key_header: str = "X-API-Key"
    #: The API keys (principal, scopes, key hash); managed by `mcp-appliance keys add|list|revoke`.
    keys_file: Path = Path("/etc/mcp-appliance/api_keys.json")
    #: Mode "jwt": an HS256 secret, an RS256/ES256 public key (PEM) or a JWKS document (JSON).
    jwt_key_file: Path = Path("/etc/mcp-appliance/jwt_key.pem")
    #: Required `iss` claim, named as authorization server in the resource metadata ("" = not
    #: checked: refused when environment = "production" unless auth.jwt_allow_any_issuer = true).
    jwt_issuer: str = ""
    #: Required `aud` claim: this server, as tokens name it ("" = auth.resource_url, the audience the
    #: MCP authorization spec prescribes). Both empty: not checked, refused when environment =
    #: "production" unless auth.jwt_allow_any_audience = true.
    jwt_audience: str = ""
    #: Accept JWTs minted for any audience (a token your identity provider issued for another service works here).
    jwt_allow_any_audience: bool = False
    #: Accept JWTs from any issuer the key file's keys verify.
    jwt_allow_any_issuer: bool = False
    #: Clock skew tolerated when checking exp, nbf and iat, in seconds.
    jwt_leeway: int = 30
    #: Claim naming the principal.
    jwt_principal_claim: str = "sub"
    #: Claim holding the scopes: a space-separated string (e.g. "scope") or a list (e.g. "scp").
    jwt_scope_claim: str = "scope"
    #: Public URL of the MCP endpoint, for the OAuth protected-resource metadata
    #: ("" = built from the request's Host and scheme).
    resource_url: str = ""


@dataclass(frozen=True)
class PolicySettings:
    """Which scopes a tool, resource or prompt requires."""

    #: Rules "<kind>:<pattern> = <scope> [<scope> …]", kind tool, resource or prompt, pattern with
    #: * and ? wildcards (resources match on the URI in RFC 3986 canonical form, and on what the
    #: hosted MCPServer resolves it to); the first matching rule decides.
    rules: tuple[str, ...] = ("tool:add_note = notes:write", "tool:delete_note = notes:write")
    #: What a call that no rule matches gets: "allow" or "deny".
    default: Literal["allow", "deny"] = "allow"
    #: Hide from tools/list, prompts/list and resources/list what the caller may not use.
    filter_lists: bool = True


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail: one JSON line per MCP request and per admin action, under <log_dir>/audit/."""

    #: Write the audit trail (<log_dir>/audit/worker-NN.jsonl and admin.jsonl).
    enabled: bool = True
    #: When records reach the disk: "every" record (slow), at most fsync_interval seconds
    #: later ("interval"), or when the kernel decides ("none"). A crashed process loses nothing either way.
    fsync: Literal["interval", "every", "none"] = "interval"
    #: Seconds between fsyncs with fsync = "interval".
    fsync_interval: float = 1.0
    #: Record tool/prompt arguments verbatim (they may hold personal data); a SHA-256 digest always.
    raw_arguments: bool = False
    #: Size at which an audit file is rotated by its writer, in bytes.
    max_bytes: int = 100 * 1024 * 1024
    #: Rotated audit files kept per process.
    backups: int = 10
    #: When an audit record cannot be written (disk full, read-only): "refuse" answers calls 503
    #: before they run until records can be written again, "continue" serves them unaudited
    #: (counted and logged); "auto": "refuse" when environment = "production", else "continue".
    on_error: Literal["auto", "refuse", "continue"] = "auto"


def audit_refuses(settings: Settings) -> bool:
    """Whether calls are refused while the audit trail cannot be written (audit.on_error, "auto" resolved)."""
    mode = settings.audit.on_error
    return mode == "refuse" or (mode == "auto" and settings.environment == "production")


@dataclass(frozen=True)
class LimitsSettings:
    """Request limits: per client address in nginx (every request), per verified principal in the workers."""

    #: Requests per second per verified principal, shared by all workers of the host, however its
    #: credential is spelled (auth.mode "none": per client address); checked after authentication,
    #: so it cannot be dodged with made-up credentials; 0: no limit.
    rate: int = 100
    #: Requests above the rate accepted at once before 429.
    burst: int = 200
    #: Requests per second per client address, whatever headers they carry (bad credentials too),
    #: counted by nginx before a worker is bothered; 0: no limit. Keep it above `rate`, and above
    #: what the clients behind one NAT or untrusted proxy send together.
    address_rate: int = 200
    #: Requests above address_rate accepted at once before 429.
    address_burst: int = 400
    #: Concurrent connections per client address (open SSE streams count); 0: no limit.
    connections: int = 256
    #: Networks (CIDR) no limit applies to, the host itself by default. Both the connecting address
    #: and the client address must be in them: a client behind a trusted proxy is never exempt
    #: because of the proxy's address, nor because of what X-Forwarded-For says.
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: Retry-After of a 429 answer, in seconds.
    retry_after: int = 1
    #: Longest request header line, in KiB; longer headers get 400.
    header_buffer_kb: int = 16
    #: Seconds a client may take to send its request headers.
    client_header_timeout: int = 10
    #: Seconds nginx waits between two reads of a request body.
    client_body_timeout: int = 30
    #: Size of each limit table, in MiB: nginx's per-address tables (about 8,000 clients per MiB) and
    #: the workers' shared per-principal table (<run_dir>/limits.buckets, 32,768 callers per MiB).
    zone_mb: int = 10


@dataclass(frozen=True)
class TlsSettings:
    """Optional TLS termination in nginx (HTTP/2, TLS 1.2 and 1.3 only)."""

    #: Terminate TLS in nginx (off when a load balancer or ingress in front does it).
    enabled: bool = False
    #: The HTTPS listener's port (on http.host).
    port: int = 443
    #: Certificate chain (PEM), read by nginx's master: the service user under systemd, root when started as root.
    cert_file: Path = Path("/etc/mcp-appliance/tls/cert.pem")
    #: Private key of the certificate (PEM); readable by root and the service user's group only (0640).
    key_file: Path = Path("/etc/mcp-appliance/tls/key.pem")
    #: Answer plain HTTP with a 308 redirect to HTTPS (the /health endpoints stay on HTTP for probes).
    redirect_http: bool = False
    #: Send Strict-Transport-Security on HTTPS answers.
    hsts: bool = False


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint /metrics."""

    #: Client networks (CIDR) nginx lets read /metrics; empty: everyone.
    allow_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateSettings:
    """What spans workers and hosts: the keys that seal multi-round-trip requestState."""

    #: The request-state key ring (one secret per line, the first seals, every line unseals), readable
    #: only by the service user; every worker and every host of a fleet must use the same file.
    #: Empty: <data_dir>/request-state.keys, generated at the first start. Rotate with
    #: `mcp-appliance keys rotate-state`.
    keys_file: str = ""
    #: Seconds a sealed requestState stays valid (the time a user has to answer a question).
    request_ttl: int = 600


@dataclass(frozen=True)
class NotesSettings:
    """The default notes server's data: SQLite on one host, or one PostgreSQL database for several."""

    #: A file (readable only by the service user, e.g. mode 0640) holding a PostgreSQL URL
    #: (postgresql://user:password@host:5432/db, or a libpq conninfo): the notes server keeps its
    #: notes there, with full-text search, and its events cross hosts by LISTEN/NOTIFY. The URL is
    #: a secret: never shown in /config, logs or metrics. Empty: SQLite under data_dir (one host;
    #: every node or pod has its own notes).
    database_url_file: str = ""


#: The name of the server the [mcp] section configures (at mcp.path); not a [servers.<name>] name.
DEFAULT_SERVER = "default"
#: URL paths of the appliance itself: no server path may be one of them or lie under one.
RESERVED_PATHS = ("/health", "/admin", "/metrics", "/config", "/_appliance")
SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class ServerSettings:
    """One hosted server: a table [servers.<name>] (the [mcp] section is the server "default" at mcp.path).

    Every server is hosted by every worker (servers share workers.count; one pool, one process per
    core), or by its first `workers` only (a pool of its own); nginx routes each server's path to
    its pool like mcp.path. Not set from the environment.
    """

    #: The table's name ([a-z0-9][a-z0-9_-]*): the `server` label of metrics and field of audit records.
    name: str
    #: URL path of this server's MCP endpoint; absent: /servers/<name>/mcp.
    path: str = ""
    #: `module:attribute` naming an MCPServer or any Streamable HTTP ASGI app (exactly one of app and command).
    app: str = ""
    #: A stdio MCP server each worker runs as a child, as a list, e.g. ["npx", "-y",
    #: "@modelcontextprotocol/server-filesystem", "/srv/files"] (exactly one of app and command).
    command: tuple[str, ...] = ()
    #: Environment variables of the command, a table of strings (only with command); put secrets in env_files.
    env: tuple[tuple[str, str], ...] = ()
    #: Environment variables of the command read from files, a table name = "/path/of/file" (only with
    #: command): the file's content (a trailing newline dropped) is the value, read when a worker
    #: starts; never shown in /config, logs or audit records.
    env_files: tuple[tuple[str, str], ...] = ()
    #: Working directory of the command (an absolute path; only with command); absent: data_dir.
    cwd: str = ""
    #: "shared" (one child per worker for every client: stateless servers) or "session" (a child per
    #: legacy session, a bounded pool for 2026-07-28 requests); only with command.
    isolation: Literal["shared", "session"] = "shared"
    #: Children of this command one worker runs at most (only with command); beyond it a new session gets 503.
    max_children: int = 32
    #: Answer POSTs with one JSON body (true), an SSE stream (false) or as each asks ("auto", an MCPServer
    #: only; a command server streams), as mcp.json_response; absent: mcp.json_response.
    json_response: JsonResponse = "auto"
    #: Legacy (2025-11-25 and earlier) sessions; false makes the legacy era stateless; absent: mcp.sessions.
    sessions: bool = True
    #: Policy rules for this server's tools, resources and prompts, as policy.rules; absent: policy.rules.
    policy_rules: tuple[str, ...] | None = None
    #: What a call to this server that no rule matches gets ("allow" or "deny"); absent: policy.default.
    policy_default: Literal["allow", "deny"] | None = None
    #: Requests per second one principal (auth.mode "none": one client address) may send to this server,
    #: a budget of its own, apart from the other servers'; 0: no limit here. Absent: limits.rate, one
    #: budget shared with every server that has no rate of its own.
    rate: int | None = None
    #: Requests above this server's rate accepted at once before 429; absent: limits.burst.
    burst: int | None = None
    #: Open legacy sessions with this server per worker; beyond it a new session to it gets 503.
    max_sessions: int | None = None
    #: Open legacy sessions with this server per worker that one principal (auth.mode "none": one client
    #: address) may hold; beyond it 429 (limits.exempt clients are not held to it).
    max_sessions_per_principal: int | None = None
    #: How many of the appliance's workers host this server: workers 0 up to this number (all of them while
    #: workers.count is lower). Only they run it (and its children) and get its calls; while none of them
    #: runs (with 1: while worker 0 restarts) its calls get 503, safe to retry.
    workers: int | None = None

    @property
    def kind(self) -> Literal["app", "command"]:
        """How the server is hosted: an imported Python app, or a stdio command."""
        return "command" if self.command else "app"

    def hosted_by(self, index: int) -> bool:
        """Whether worker `index` hosts this server (see `workers`)."""
        return self.workers is None or index < self.workers

    def policy(self, shared: PolicySettings) -> PolicySettings:
        """This server's policy: its own rules and default where set, the [policy] section's otherwise."""
        return dataclasses.replace(
            shared,
            rules=shared.rules if self.policy_rules is None else self.policy_rules,
            default=shared.default if self.policy_default is None else self.policy_default,
        )


#: Keys of a [servers.<name>] table whose absence means another setting's value (or a derived one).
SERVER_INHERITS: Mapping[str, str] = {
    "path": "/servers/<name>/mcp",
    "json_response": "mcp.json_response",
    "sessions": "mcp.sessions",
    "policy_rules": "policy.rules",
    "policy_default": "policy.default",
    "cwd": "data_dir",
    "rate": "limits.rate (one budget shared with the other servers that have no rate)",
    "burst": "limits.burst",
    "workers": "every worker (workers.count)",
    "max_sessions": "no cap of its own (mcp.max_sessions holds across every server)",
    "max_sessions_per_principal": "no cap of its own (mcp.max_sessions_per_principal holds across every server)",
}
#: Keys that only a command server takes.
COMMAND_ONLY = ("env", "env_files", "cwd", "isolation", "max_children")


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry traces of every MCP request and admin operation, sent to an OTLP/HTTP receiver."""

    #: Record spans and send them to tracing.endpoint; off: no span is recorded and nothing is sent.
    enabled: bool = False
    #: The OTLP/HTTP (protobuf) traces URL of an OpenTelemetry Collector, Jaeger or Tempo, path
    #: included, e.g. "http://127.0.0.1:4318/v1/traces" (https for TLS).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    #: A file (a secret, readable by the service user) of "Name: value" lines sent as headers with every
    #: export, e.g. "Authorization: Bearer …" for a hosted backend; empty: none.
    headers_file: str = ""
    #: Share of new traces recorded, 0 to 1; a request whose traceparent says "sampled" (or "not
    #: sampled") is recorded (or not) whatever the ratio, so a trace is never cut in half.
    sample_ratio: float = 1.0
    #: Spans a process keeps waiting for export; when the receiver is down or slow, spans beyond it are
    #: dropped (counted in mcp_appliance_trace_spans_dropped_total): a request never waits for tracing.
    queue_size: int = 2048
    #: Seconds one export may take (retries included) before its spans are given up (counted as dropped).
    export_timeout: float = 10.0


@dataclass(frozen=True)
class Settings:
    """Every knob of the appliance."""

    #: Name in logs, metrics and /health.
    service_name: str = "mcp-appliance"
    #: "production" enforces authentication and protects /config with the admin token.
    environment: Environment = "development"
    #: Version reported in /health and metrics (defaults to the package version).
    version: str = __version__
    log_level: LogLevel = "info"
    #: Hosted data (the notes database); given to hosted apps as MCP_APPLIANCE_DATA_DIR.
    data_dir: Path = Path("/var/lib/mcp-appliance")
    #: Process logs and the audit trail.
    log_dir: Path = Path("/var/log/mcp-appliance")
    #: Rendered configs, sockets, pid files, metrics files; recreated at each start.
    run_dir: Path = Path("/run/mcp-appliance")
    #: Unprivileged user for every process but supervisord and the nginx master,
    #: applied only when the appliance starts as root.
    user: str = "mcp-appliance"
    #: "files": supervisord writes each process's output under log_dir and rotates it;
    #: "stdout": everything goes to supervisord's stdout (containers).
    log_target: Literal["files", "stdout"] = "files"
    #: Rotation of the files under log_dir (supervisord does it; no logrotate needed).
    log_max_bytes: int = 50 * 1024 * 1024
    #: Rotated files kept per log.
    log_backups: int = 5
    http: HttpSettings = field(default_factory=HttpSettings)
    workers: WorkersSettings = field(default_factory=WorkersSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    state: StateSettings = field(default_factory=StateSettings)
    notes: NotesSettings = field(default_factory=NotesSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    #: The [servers.<name>] tables in file order (see ServerSettings); the [mcp] server comes before them.
    servers: tuple[ServerSettings, ...] = ()
    #: Where these settings came from, for error messages and rendered headers.
    source: str = field(default="built-in defaults", compare=False)

    def worker_port(self, index: int) -> int:
        """The loopback port of worker `index`."""
        return self.workers.base_port + index

    @property
    def hosted_servers(self) -> tuple[ServerSettings, ...]:
        """Every server the workers host: the [mcp] one ("default" at mcp.path) first, then [servers.*]."""
        m = self.mcp
        default = ServerSettings(name=DEFAULT_SERVER, path=m.path, app=m.app, json_response=m.json_response,
                                 sessions=m.sessions)
        return (default, *self.servers)

    @property
    def own_pools(self) -> dict[str, int]:
        """The servers hosted by some workers only, with nginx pools of their own: name -> worker count."""
        return {server.name: server.workers for server in self.servers if server.workers is not None}

    @property
    def state_keys_path(self) -> Path:
        """The request-state key ring: state.keys_file, or the one generated under data_dir."""
        return Path(self.state.keys_file) if self.state.keys_file else self.data_dir / "request-state.keys"


#: The seed's environment names, kept working: name -> dotted key.
ENV_ALIASES: Mapping[str, str] = {
    "ENVIRONMENT": "environment",
    "SERVICE_NAME": "service_name",
    "VERSION": "version",
    "LOG_LEVEL": "log_level",
    "MCP_HOST": "http.host",
    "MCP_PORT": "http.port",
}


def env_name(key: str) -> str:
    """The MCP_APPLIANCE_* variable that overrides dotted `key`."""
    return ENV_PREFIX + key.replace(".", "_").upper()


#: Settings fields that are not keys of their own: where settings came from, and the server tables
#: (documented by ServerSettings, read by `_build_servers`, not set from the environment).
_NOT_KEYS = frozenset({"source", "servers"})


def iter_keys(cls: type = Settings, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every leaf key as (dotted key, field, resolved type), in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS:
            continue
        hint = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            yield from iter_keys(hint, key + ".")
        else:
            yield key, f, hint


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """The config file to read: --config, then MCP_APPLIANCE_CONFIG, then the default."""
    return Path(cli_path or environ.get("MCP_APPLIANCE_CONFIG") or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None,
                  hostname: str | None = None) -> Settings:
    """Read the TOML file (missing means defaults), apply the environment, validate.

    `hostname` (default: this machine's) is read only when node.ordinal is -1.
    """
    environ = os.environ if environ is None else environ
    path = path or config_path(None, environ)
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        source = str(path)
    overrides = _env_overrides(environ)
    if overrides:
        source += " + environment"
    settings = _build(Settings, raw, overrides, "", str(path))
    settings = dataclasses.replace(settings, source=source)
    if settings.node.ordinal == ORDINAL_FROM_HOSTNAME:
        ordinal = ordinal_from_hostname(hostname or socket.gethostname(), settings.source)
        settings = dataclasses.replace(settings, node=dataclasses.replace(settings.node, ordinal=ordinal))
    validate(settings)
    return settings


def ordinal_from_hostname(hostname: str, source: str = "built-in defaults") -> int:
    """The ordinal a StatefulSet pod's name `<name>-<ordinal>` ends with."""
    match = re.fullmatch(r"[A-Za-z0-9.-]*?-(\d+)", hostname.split(".", 1)[0])
    if not match:
        raise ConfigError(f"{source}: 'node.ordinal' = -1 (from the host name) but host name {hostname!r} does not "
                          "end in -<ordinal> (StatefulSet pods are named <name>-<ordinal>); set node.ordinal explicitly")
    return int(match[1])


def _env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Dotted key -> raw string from the environment; unknown MCP_APPLIANCE_* names are errors."""
    by_env = {env_name(key): key for key, _, _ in iter_keys()}
    found: dict[str, str] = {}
    for name, key in ENV_ALIASES.items():
        if name in environ:
            found[key] = environ[name]
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        if name not in by_env:
            raise ConfigError(f"environment variable {name}: unknown setting (known: see README, e.g. {env_name('workers.count')})")
        found[by_env[name]] = value
    return found


def _build(cls: type, raw: Mapping[str, Any], env: Mapping[str, str], prefix: str, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    if cls is Settings and "servers" in raw:
        servers = raw["servers"]
        raw = {k: v for k, v in raw.items() if k != "servers"}
        base = _build(cls, raw, env, prefix, path)
        return dataclasses.replace(base, servers=_build_servers(servers, path, base.mcp))
    for name in raw:
        if name not in names:
            where = f"[{prefix[:-1]}]" if prefix else "top level"
            raise ConfigError(f"{path}: unknown key '{prefix}{name}' ({where} knows: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS:
            continue
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = raw.get(f.name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: '{key}' must be a table [{key}], got {type(section).__name__}")
            values[f.name] = _build(hint, section, env, key + ".", path)
        elif key in env:
            values[f.name] = _from_env(key, env[key], hint)
        elif f.name in raw:
            values[f.name] = _coerce(key, raw[f.name], hint, path)
    return cls(**values)


def _build_servers(raw: Any, path: str, mcp: McpSettings) -> tuple[ServerSettings, ...]:
    """The [servers.<name>] tables, in file order; types checked here, the rest in `validate`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'servers' must be tables [servers.<name>], got {type(raw).__name__}")
    hints = typing.get_type_hints(ServerSettings)
    known = [f.name for f in dataclasses.fields(ServerSettings) if f.name != "name"]
    servers = []
    for name, table in raw.items():
        where = f"servers.{name}"
        if not SERVER_NAME.match(name):
            raise ConfigError(f"{path}: '[{where}]' is an invalid server name: expected lower-case letters, digits, "
                              "'_' or '-', starting with a letter or digit")
        if name == DEFAULT_SERVER:
            raise ConfigError(f"{path}: '[{where}]': the name {DEFAULT_SERVER!r} is the [mcp] server's; choose another")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{where}' must be a table [{where}], got {type(table).__name__}")
        values: dict[str, Any] = {"name": name}
        for key, value in table.items():
            dotted = f"{where}.{key}"
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{dotted}' ([{where}] knows: {', '.join(sorted(known))})")
            if key in ("env", "env_files"):
                if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                    raise ConfigError(f"{path}: '{dotted}' = {value!r} is invalid: expected a table of strings")
                values[key] = tuple(value.items())
            elif key == "command":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"{path}: '{dotted}' = {value!r} is invalid: expected a non-empty list of "
                                      "strings, the program first, e.g. [\"npx\", \"-y\", \"@scope/server\"]")
                values[key] = tuple(value)
            else:
                hint = hints[key]
                if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`: None is only the absence
                    hint = next(a for a in typing.get_args(hint) if a is not type(None))
                values[key] = _coerce(dotted, value, hint, path)
        for key in COMMAND_ONLY:
            if key in table and "command" not in table:
                raise ConfigError(f"{path}: '{where}.{key}' is set but '{where}.command' is not: {key} applies "
                                  "only to a stdio server (command)")
        values.setdefault("path", f"/servers/{name}/mcp")
        values.setdefault("json_response", mcp.json_response)
        values.setdefault("sessions", mcp.sessions)
        servers.append(values)
    return tuple(ServerSettings(**v) for v in servers)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any, path: str) -> Any:
    """A TOML value checked against the field's type."""
    bad = ConfigError(f"{path}: '{key}' = {value!r} is invalid: expected {_describe(hint)}")
    origin = typing.get_origin(hint)
    if origin is Literal:
        # By type too: 1 == True, but 1 is not a TOML boolean.
        if not any(value == a and type(value) is type(a) for a in typing.get_args(hint)):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad
        return Path(value)
    raise TypeError(f"no coercion for {hint}")  # a programming error, not an operator's


_BOOL_WORDS = frozenset({"1", "0", "true", "false", "yes", "no", "on", "off"})


def _from_env(key: str, text: str, hint: Any) -> Any:
    """An environment string parsed as the field's type."""
    name = env_name(key)
    origin = typing.get_origin(hint)
    try:
        if hint is bool or (origin is Literal and text.strip().lower() in _BOOL_WORDS
                            and any(isinstance(a, bool) for a in typing.get_args(hint))):
            lowered = text.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError
            value: Any = lowered in {"1", "true", "yes", "on"}
        elif hint is int:
            value = int(text)
        elif hint is float:
            value = float(text)
        elif origin is tuple:
            value = [part.strip() for part in text.split(",") if part.strip()]
        else:
            value = text
    except ValueError:
        raise ConfigError(f"environment {name}={text!r} (key '{key}') is invalid: expected {_describe(hint)}") from None
    return _coerce(key, value, hint, f"environment {name}")


_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def validate(settings: Settings) -> None:
    """Checks that span more than one value's type; raises ConfigError naming the key."""

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{settings.source}: '{key}' = {value!r} is invalid: expected {expected}")

    for key, value in (("http.port", settings.http.port), ("admin.port", settings.admin.port)):
        need(1 <= value <= 65535, key, value, "a TCP port 1-65535")
    w = settings.workers
    need(1 <= w.count <= 64, "workers.count", w.count, "1 to 64 workers")
    need(1024 <= w.base_port and w.base_port + w.count - 1 <= 65535, "workers.base_port", w.base_port,
         "a port from 1024 leaving room for workers.count ports")
    need(_is_loopback(w.host), "workers.host", w.host, "a loopback address (workers are reached only through nginx)")
    need(_is_loopback(settings.admin.host), "admin.host", settings.admin.host, "a loopback address")
    need(w.graceful_timeout >= 0, "workers.graceful_timeout", w.graceful_timeout, "seconds >= 0")
    # Below 2 s a worker under a burst of load could be restarted before it had a chance to answer.
    need(2 <= w.hang_timeout <= 3600, "workers.hang_timeout", w.hang_timeout, "seconds from 2 to 3600")
    need(1 <= w.read_timeout <= settings.http.read_timeout, "workers.read_timeout", w.read_timeout,
         f"seconds from 1 to http.read_timeout ({settings.http.read_timeout})")
    need(_is_address(settings.http.host), "http.host", settings.http.host, "an IP address to listen on, e.g. 0.0.0.0 or ::")
    for key in ("max_body_bytes", "read_timeout", "connect_timeout", "upstream_keepalive", "worker_connections"):
        value = getattr(settings.http, key)
        need(value > 0, f"http.{key}", value, "a positive integer")
    need(0 <= settings.http.nginx_workers <= 1024, "http.nginx_workers", settings.http.nginx_workers,
         "0 (one per 4 CPUs) to 1024")
    m = settings.mcp
    _validate_servers(settings, need)
    for key in ("session_idle_timeout", "max_sessions", "max_sessions_per_principal", "max_body_bytes"):
        value = getattr(m, key)
        need(value > 0, f"mcp.{key}", value, "a positive integer")
    need(1 <= settings.health.min_ready_workers <= w.count, "health.min_ready_workers",
         settings.health.min_ready_workers, f"1 to workers.count ({w.count})")
    need(settings.health.probe_timeout > 0, "health.probe_timeout", settings.health.probe_timeout, "seconds > 0")
    need(0 <= settings.node.ordinal <= 999, "node.ordinal", settings.node.ordinal, "0 to 999, or -1 for the host name's")
    node = settings.node
    for k, peer in enumerate(node.peers):
        need(split_address(peer) is not None, f"node.peers[{k}]", peer, "'host:port', e.g. '10.0.0.2:80' or '[::1]:8080'")
    template = node.peer_address
    need(not template or (template.count("{ordinal}") == 1 and split_address(template.replace("{ordinal}", "0")) is not None
                          and "{" not in template.replace("{ordinal}", "")),
         "node.peer_address", template, "'host:port' containing {ordinal} once, e.g. 'app-{ordinal}.app-peers.ns.svc.cluster.local:8080'")
    need(not (template and node.peers), "node.peer_address", template, "empty when node.peers is set (use one or the other)")
    for k, server in enumerate(node.resolver):
        need(_is_resolver(server), f"node.resolver[{k}]", server, "an IP address, optionally with :port, e.g. '10.96.0.10' or '127.0.0.1:5353'")
    need(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", settings.service_name)), "service_name", settings.service_name,
         "letters, digits, '.', '_' or '-'")
    need(settings.log_max_bytes >= 1024, "log_max_bytes", settings.log_max_bytes, "bytes >= 1024")
    need(settings.log_backups >= 0, "log_backups", settings.log_backups, "an integer >= 0")
    need(bool(re.fullmatch(r"[a-z_][a-z0-9_-]*", settings.user)), "user", settings.user, "a system user name")
    for key in ("data_dir", "log_dir", "run_dir"):
        value = getattr(settings, key)
        need(value.is_absolute(), key, str(value), "an absolute path")
    _validate_gate(settings, need)
    need(not settings.state.keys_file or Path(settings.state.keys_file).is_absolute(), "state.keys_file",
         settings.state.keys_file, "empty or an absolute path")
    need(1 <= settings.state.request_ttl <= 86400, "state.request_ttl", settings.state.request_ttl, "1 to 86400 seconds")
    _validate_tracing(settings.tracing, need)
    # nginx, the admin app and the workers all bind on this host: one port each.
    ports: dict[int, str] = {}
    claims = [("http.port", settings.http.port), ("admin.port", settings.admin.port)]
    claims += [(f"workers.base_port (worker {k})", settings.worker_port(k)) for k in range(w.count)]
    if settings.tls.enabled:
        claims.append(("tls.port", settings.tls.port))
    for key, port in claims:
        if port in ports:
            raise ConfigError(f"{settings.source}: port clash: '{key}' and '{ports[port]}' both use port {port}")
        ports[port] = key


def _is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host (and a valid port, when given)."""
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # raises ValueError for a port out of range or not a number
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname) and not any(c.isspace() for c in text)


def _validate_tracing(t: TracingSettings, need: typing.Callable[[bool, str, Any, str], None]) -> None:
    need(_is_http_url(t.endpoint), "tracing.endpoint", t.endpoint,
         "an http:// or https:// URL of an OTLP/HTTP receiver, e.g. 'http://127.0.0.1:4318/v1/traces'")
    need(0.0 <= t.sample_ratio <= 1.0, "tracing.sample_ratio", t.sample_ratio, "a number from 0 to 1")
    need(1 <= t.queue_size <= 1_000_000, "tracing.queue_size", t.queue_size, "1 to 1000000 spans")
    need(0 < t.export_timeout <= 60, "tracing.export_timeout", t.export_timeout, "seconds > 0, at most 60")
    need(not t.headers_file or Path(t.headers_file).is_absolute(), "tracing.headers_file", t.headers_file,
         "empty or an absolute path")


_RULE = re.compile(r"^\s*(tool|resource|prompt):(\S+)\s*=\s*(\S+(?:\s+\S+)*)\s*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")


def split_rule(rule: str) -> tuple[str, str, tuple[str, ...]]:
    """(kind, pattern, scopes) of a policy rule "kind:pattern = scope …"; ValueError if malformed."""
    match = _RULE.match(rule)
    if not match:
        raise ValueError(rule)
    return match[1], match[2], tuple(match[3].split())


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _validate_gate(settings: Settings, need: typing.Callable[[bool, str, Any, str], None]) -> None:
    """Checks of the auth, policy, audit, limits, TLS and metrics settings."""
    a = settings.auth
    if a.mode == "none" and settings.environment == "production" and not a.allow_none_in_production:
        raise ConfigError(
            f"{settings.source}: 'auth.mode' = 'none' is refused when environment = 'production': choose "
            "'api_keys' or 'jwt', or set 'auth.allow_none_in_production' = true to accept unauthenticated callers"
        )
    need(bool(_HEADER_NAME.match(a.api_key_header)) and a.api_key_header.lower() not in {"authorization", "host"},
         "auth.api_key_header", a.api_key_header, "an HTTP header name such as X-API-Key")
    for k, scope in enumerate(a.anonymous_scopes):
        need(bool(scope) and " " not in scope, f"auth.anonymous_scopes[{k}]", scope, "a scope without spaces")
    if a.mode == "jwt" and settings.environment == "production":
        # The MCP authorization spec: a server accepts only tokens minted for it (RFC 8707 audience).
        if not (a.jwt_audience or a.resource_url) and not a.jwt_allow_any_audience:
            raise ConfigError(
                f"{settings.source}: 'auth.jwt_audience' is empty with auth.mode = 'jwt' in production: a token "
                "minted for any other service would be accepted; set it (or 'auth.resource_url') to this server's "
                "URL as your identity provider puts it in 'aud', or set 'auth.jwt_allow_any_audience' = true"
            )
        if not a.jwt_issuer and not a.jwt_allow_any_issuer:
            raise ConfigError(
                f"{settings.source}: 'auth.jwt_issuer' is empty with auth.mode = 'jwt' in production: set it to "
                "your identity provider's issuer URL ('iss'), or set 'auth.jwt_allow_any_issuer' = true"
            )
    need(a.jwt_leeway >= 0, "auth.jwt_leeway", a.jwt_leeway, "seconds >= 0")
    need(bool(a.jwt_principal_claim), "auth.jwt_principal_claim", a.jwt_principal_claim, "a claim name")
    need(bool(a.jwt_scope_claim), "auth.jwt_scope_claim", a.jwt_scope_claim, "a claim name")
    need(not a.resource_url or bool(re.match(r"^https?://[^/\s]+(/\S*)?$", a.resource_url)), "auth.resource_url",
         a.resource_url, "empty or an http(s) URL such as https://mcp.example.com/mcp")
    _check_rules(settings.policy.rules, "policy.rules", need)
    au = settings.audit
    need(au.fsync_interval > 0, "audit.fsync_interval", au.fsync_interval, "seconds > 0")
    need(au.max_bytes >= 4096, "audit.max_bytes", au.max_bytes, "bytes >= 4096")
    need(au.backups >= 1, "audit.backups", au.backups, "an integer >= 1 (rotation keeps the previous file)")
    lim = settings.limits
    for key in ("rate", "burst", "address_rate", "address_burst", "connections"):
        need(getattr(lim, key) >= 0, f"limits.{key}", getattr(lim, key), "an integer >= 0 (0: no limit)")
    for key in ("retry_after", "header_buffer_kb", "client_header_timeout", "client_body_timeout", "zone_mb"):
        need(getattr(lim, key) > 0, f"limits.{key}", getattr(lim, key), "a positive integer")
    need(lim.header_buffer_kb <= 1024, "limits.header_buffer_kb", lim.header_buffer_kb, "at most 1024 KiB")
    for key, networks in (("http.trusted_proxies", settings.http.trusted_proxies), ("limits.exempt", lim.exempt),
                          ("metrics.allow_from", settings.metrics.allow_from)):
        for k, net in enumerate(networks):
            need(_is_network(net), f"{key}[{k}]", net, "an IP address or CIDR network, e.g. 10.0.0.0/8")
    t = settings.tls
    need(1 <= t.port <= 65535, "tls.port", t.port, "a TCP port 1-65535")


def _check_rules(rules: tuple[str, ...], key: str, need: typing.Callable[[bool, str, Any, str], None]) -> None:
    """Policy rules (policy.rules or a server's policy_rules) are well-formed."""
    for k, rule in enumerate(rules):
        try:
            kind, pattern, _ = split_rule(rule)
        except ValueError:
            need(False, f"{key}[{k}]", rule, "'<tool|resource|prompt>:<pattern> = <scope> [<scope> ...]', "
                 "e.g. 'tool:delete_* = notes:write'")
            continue
        # Resource URIs are matched in their canonical form: a pattern in another spelling would never match.
        need(kind != "resource" or canonical_uri(pattern) == pattern, f"{key}[{k}]", rule,
             f"the URI pattern in canonical form (RFC 3986): '{canonical_uri(pattern)}'")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def server_table(server: ServerSettings) -> str:
    """The table of a server's settings as the operator wrote it: "mcp" for the default server."""
    return "mcp" if server.name == DEFAULT_SERVER else f"servers.{server.name}"


def server_key(server: ServerSettings, key: str) -> str:
    """The dotted key of a server's setting as the operator wrote it (the default server's is under [mcp])."""
    return f"{server_table(server)}.{key}"


def _under(path: str, other: str) -> bool:
    """Whether URL path `path` is `other` or lies below it."""
    return path == other or path.startswith(other.rstrip("/") + "/")


def _validate_servers(settings: Settings, need: typing.Callable[[bool, str, Any, str], None]) -> None:
    """Every hosted server: a path of its own, exactly one of app and command, valid per-server values."""
    seen: dict[str, str] = {}  # path -> key
    apps: dict[str, str] = {}  # app -> key
    for server in settings.hosted_servers:
        key = server_key(server, "path")
        p = server.path
        need(p.startswith("/") and p != "/" and bool(re.fullmatch(r"/[A-Za-z0-9._~/-]+", p)) and "//" not in p
             and "/./" not in p + "/" and "/../" not in p + "/", key, p,
             "an absolute URL path of letters, digits and . _ ~ - such as /servers/files/mcp")
        need(not any(_under(p, r) for r in RESERVED_PATHS), key, p,
             f"a path not used by the appliance itself ({', '.join(RESERVED_PATHS)})")
        for other, other_key in seen.items():
            if _under(p, other) or _under(other, p):
                raise ConfigError(f"{settings.source}: '{key}' = {p!r} is invalid: '{other_key}' = {other!r} is "
                                  "already there (each server needs a path of its own, not under another's)")
        seen[p] = key
        where = server_table(server)
        if bool(server.app) == bool(server.command):
            raise ConfigError(f"{settings.source}: '[{where}]' needs exactly one of '{where}.app' (a Python server, "
                              f"'module:attribute') and '{where}.command' (a stdio program), "
                              f"{'not both' if server.app else 'found neither'}")
        if server.app:
            app_key = server_key(server, "app")
            need(bool(_APP_SPEC.match(server.app)), app_key, server.app, "'module:attribute', e.g. 'mypkg.server:mcp'")
            # One MCPServer object builds one transport: the same app twice would share (and break) it.
            if server.app in apps:
                raise ConfigError(f"{settings.source}: '{app_key}' = {server.app!r} is invalid: '{apps[server.app]}' "
                                  "hosts it already (one app per server)")
            apps[server.app] = app_key
        for name, _ in server.env + server.env_files:
            need(bool(_ENV_NAME.match(name)), server_key(server, "env"), name, "environment variable names "
                 "(letters, digits, '_')")
        for name, file in server.env_files:
            need(Path(file).is_absolute(), f"{server_key(server, 'env_files')}.{name}", file, "an absolute path")
        need(not server.cwd or Path(server.cwd).is_absolute(), server_key(server, "cwd"), server.cwd, "an absolute path")
        need(1 <= server.max_children <= 4096, server_key(server, "max_children"), server.max_children,
             "1 to 4096 children")
        if server.policy_rules is not None:
            _check_rules(server.policy_rules, server_key(server, "policy_rules"), need)
        for key in ("rate", "burst"):
            value = getattr(server, key)
            need(value is None or value >= 0, server_key(server, key), value, "an integer >= 0")
        for key in ("max_sessions", "max_sessions_per_principal"):
            value = getattr(server, key)
            need(value is None or value >= 1, server_key(server, key), value, "an integer >= 1")
        need(server.workers is None or 1 <= server.workers <= 64, server_key(server, "workers"), server.workers,
             "1 to 64 workers (as workers.count)")


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' (host a DNS name, an IPv4 address or a bracketed IPv6 one), else None."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        return (host[1:-1], int(port)) if _is_address(host[1:-1]) and ":" in host else None
    if ":" in host:  # an IPv6 address needs brackets, or its port would be ambiguous
        return None
    return (host, int(port)) if _is_address(host) or _HOST_NAME.match(host) else None


def _is_resolver(server: str) -> bool:
    return _is_address(server) or (split_address(server) is not None and _is_address(split_address(server)[0]))  # type: ignore[index]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain JSON-able data, secrets replaced."""

    def plain(value: Any) -> Any:
        if isinstance(value, ServerSettings):
            doc = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            # Values of env may be secrets by name (a GITHUB_TOKEN): shown as a table, redacted as one;
            # env_files shows where secrets are read from, never what the files hold.
            doc["env"] = {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS + ("key", "auth")) else v)
                          for k, v in value.env}
            doc["env_files"] = dict(value.env_files)
            return doc
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    data = plain(settings)
    return _redact(data)


_SECRET_WORDS = ("token", "secret", "password", "key_file", "private")


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if any(w in k for w in _SECRET_WORDS) and data[k] else _redact(v)) for k, v in data.items()}
    return data

