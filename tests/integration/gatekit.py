"""Helpers for the gate's integration tests: keys made with the real CLI, audit records, raw calls."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx2

from tests.harness import Appliance, http, to_toml
from tests.integration.clients import modern_request


def write_config(appliance: Appliance) -> None:
    """Write appliance.toml before start, so CLI commands (keys add) can run first."""
    appliance.config_path.write_text(to_toml(appliance.settings))


def add_key(appliance: Appliance, principal: str, *scopes: str) -> str:
    """A new API key made by `mcp-appliance keys add` (the key is the last line of its stdout)."""
    args = ["keys", "add", "--principal", principal]
    for scope in scopes:
        args += ["--scope", scope]
    result = appliance.command(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def key_id(key: str) -> str:
    return key.split("_")[1]


def audit_records(appliance: Appliance) -> list[dict[str, Any]]:
    """Every line of every audit file (json.loads fails the test on a line that is not JSON)."""
    records = []
    for path in sorted((Path(appliance.settings["log_dir"]) / "audit").glob("*.jsonl*")):
        for line in path.read_text().splitlines():
            records.append(json.loads(line))
    return records


def record_for(appliance: Appliance, request_id: str) -> dict[str, Any] | None:
    found = [r for r in audit_records(appliance) if r["request_id"] == request_id]
    assert len(found) <= 1, f"{len(found)} audit records for request {request_id}"
    return found[0] if found else None


def call(appliance: Appliance, method: str, name: str | None = None, params: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, request_id: int = 1) -> tuple[int, dict[str, str], Any]:
    """One 2026-07-28 request through nginx: status, headers, parsed JSON body (or raw bytes)."""
    base, body = modern_request(method, name, {"name": name, **(params or {})} if name and method == "tools/call"
                                else params or {}, request_id)
    status, out_headers, raw = http("POST", appliance.mcp_url, body, {**base, **(headers or {})})
    try:
        return status, out_headers, json.loads(raw)
    except ValueError:
        return status, out_headers, raw


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tls_client(cafile: Path, headers: dict[str, str] | None = None, **options: Any) -> httpx2.AsyncClient:
    """An httpx2 client that trusts the test's own certificate."""
    return httpx2.AsyncClient(verify=ssl.create_default_context(cafile=str(cafile)), headers=headers, trust_env=False,
                              timeout=httpx2.Timeout(30, read=120), **options)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (cert, key), made by the test."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-appliance test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
