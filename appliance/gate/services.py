"""What the gate's layers share in one worker: the authenticator, policy, audit writer and metrics.

Made once at worker start (files are opened here, never per request).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from appliance import keys
from appliance.conditions import PROCESS_CONDITIONS
from appliance.config import DEFAULT_SERVER, ConfigError, ServerSettings, Settings, audit_refuses, server_key
from appliance.gate.audit import AuditRecorder, AuditWriter, audit_dir
from appliance.gate.auth import Authenticator, load_authenticator
from appliance.gate.buckets import BucketsUnavailable, SharedBuckets, buckets_path
from appliance.gate.metrics import RequestMetrics
from appliance.gate.outcome import Sink
from appliance.gate.policy import Policy
from appliance.gate.resources import hosted_resources
from appliance.metrics import GateMetrics, multiproc_dir, reset_multiproc_dir


@dataclass
class GateServices:
    """The per-worker objects the gate layers use."""

    authenticator: Authenticator
    policy: Policy
    metrics: GateMetrics
    audit: AuditWriter | None
    #: The shared per-principal rate table; None only when limits.rate is 0.
    buckets: SharedBuckets | None = None
    #: Each hosted server's policy by server name (its policy_rules, or [policy]); `policy` for others.
    policies: dict[str, Policy] = field(default_factory=dict)
    #: The rate table of each server with a `rate` of its own (None: that rate is 0, no limit).
    server_buckets: dict[str, SharedBuckets | None] = field(default_factory=dict)

    def sinks(self, index: int, raw_arguments: bool, server: str = DEFAULT_SERVER) -> list[Sink]:
        """Where a finished request to `server` goes: the audit trail (when on), then the metrics."""
        sinks: list[Sink] = []
        if self.audit is not None:
            sinks.append(AuditRecorder(self.audit, index, raw_arguments, server))
        sinks.append(RequestMetrics(self.metrics, server))
        return sinks

    def policy_for(self, server: str) -> Policy:
        """The policy of the hosted server named `server`."""
        return self.policies.get(server, self.policy)

    def buckets_for(self, server: str, shared: SharedBuckets | None) -> SharedBuckets | None:
        """The rate table of the hosted server named `server`: its own, or `shared` (limits.rate's)."""
        return self.server_buckets[server] if server in self.server_buckets else shared


def gate_services(settings: Settings, index: int) -> GateServices:
    """Load credentials and open the audit file for worker `index`; ConfigError when unusable."""
    metrics = GateMetrics(index)
    audit = None
    if settings.audit.enabled:
        audit = AuditWriter(audit_dir(settings.log_dir) / f"worker-{index:02d}.jsonl", settings.audit,
                            on_failure=metrics.audit_errors.inc, conditions=PROCESS_CONDITIONS,
                            refuse=audit_refuses(settings))
    # Resource rules match what the hosted app resolves a URI to (its templates).
    policies = {server.name: Policy(server.policy(settings.policy),
                                    hosted_resources(server.app) if server.app else None)
                for server in settings.hosted_servers}
    return GateServices(
        authenticator=load_authenticator(settings),
        policy=policies[DEFAULT_SERVER],
        metrics=metrics,
        audit=audit,
        buckets=open_buckets(settings),
        policies=policies,
        server_buckets={server.name: open_buckets(settings, server) for server in settings.servers
                        if server.rate is not None},
    )


def open_buckets(settings: Settings, server: ServerSettings | None = None) -> SharedBuckets | None:
    """The workers' shared rate table under run_dir, limits.rate's or (`server`) that server's own
    (None when the rate is 0); ConfigError when unusable."""
    lim = settings.limits
    rate, burst, key = lim.rate, lim.burst, "limits.rate"
    if server is not None and server.rate is not None:
        rate, burst, key = server.rate, lim.burst if server.burst is None else server.burst, server_key(server, "rate")
    if not rate:
        return None
    try:
        return SharedBuckets(buckets_path(settings.run_dir, server.name if server else None), rate, burst, lim.zone_mb)
    except BucketsUnavailable as exc:
        raise ConfigError(f"'{key}' = {rate}: the shared rate table cannot be used: {exc}") from None


def check_gate(settings: Settings) -> None:
    """Everything the gate will need can be loaded: credentials, TLS files; ConfigError naming the key."""
    load_authenticator(settings)
    if settings.tls.enabled:
        for key in ("cert_file", "key_file"):
            path = getattr(settings.tls, key)
            if not os.access(path, os.R_OK):
                raise ConfigError(f"'tls.{key}' = '{path}': not readable")
    if settings.admin.token_file:
        keys.read_admin_token(settings)
    if settings.tracing.enabled and settings.tracing.headers_file:
        from appliance.tracing import read_headers
        read_headers(settings.tracing.headers_file)


def _readable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether `user` (by owner, group or other bits) may read `path`."""
    st = path.stat()
    groups = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)}
    return bool((st.st_uid == user.pw_uid and st.st_mode & 0o400) or (st.st_gid in groups and st.st_mode & 0o040)
                or st.st_mode & 0o004)


def preflight_gate(settings: Settings, as_root: bool) -> None:
    """Before `run` starts anything: check the gate's files, write the admin token, empty the metrics files."""
    check_gate(settings)
    keys.ensure_admin_token(settings, as_root)
    owner = None
    if as_root:
        user = pwd.getpwnam(settings.user)
        owner = (user.pw_uid, user.pw_gid)
        # The workers and the admin app read these as the service user, not as root.
        needed = {"api_keys": [("auth.keys_file", settings.auth.keys_file)],
                  "jwt": [("auth.jwt_key_file", settings.auth.jwt_key_file)]}.get(settings.auth.mode, [])
        if settings.admin.token_file:
            needed.append(("admin.token_file", Path(settings.admin.token_file)))
        if settings.tracing.enabled and settings.tracing.headers_file:
            needed.append(("tracing.headers_file", Path(settings.tracing.headers_file)))
        # A stdio server's secrets are read by its worker when it starts.
        needed += [(f"servers.{server.name}.env_files.{name}", Path(file))
                   for server in settings.servers for name, file in server.env_files]
        for key, path in needed:
            if not path.exists():
                raise ConfigError(f"'{key}' = '{path}': no such file")
            if not _readable_by(path, user):
                raise ConfigError(f"'{key}' = '{path}': not readable by the service user {settings.user!r} "
                                  f"(e.g. chgrp {settings.user} {path} && chmod 640 {path})")
    reset_multiproc_dir(multiproc_dir(settings.run_dir), owner)
    audit = audit_dir(settings.log_dir)
    audit.mkdir(exist_ok=True)
    if owner is not None:
        os.chown(audit, *owner)
