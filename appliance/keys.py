"""Credential files: the API keys file (`mcp-appliance keys …`) and the admin token.

An API key is `mcpk_<id>_<secret>`: the id finds the entry, the secret (256 random
bits) is never stored: the file holds the SHA-256 of the whole key. A fast hash is
enough for keys this random (no dictionary to try); comparisons are constant-time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import ConfigError, Settings

KEY_PREFIX = "mcpk_"
_KEY = re.compile(r"^mcpk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
_PRINCIPAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")  # RFC 6749 scope-token
ADMIN_TOKEN_NAME = "admin.token"


@dataclass(frozen=True)
class KeyEntry:
    """One API key as stored: never the key itself."""

    id: str
    principal: str
    scopes: tuple[str, ...]
    sha256: str
    created: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "principal": self.principal, "scopes": list(self.scopes),
                "sha256": self.sha256, "created": self.created}


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    match = _KEY.match(key)
    return match[1] if match else None


def matches(entry: KeyEntry, key: str) -> bool:
    """Whether `key` is the key `entry` was made from (constant-time)."""
    return hmac.compare_digest(hash_key(key), entry.sha256)


def new_key() -> tuple[str, str]:
    """(id, key) of a fresh random key."""
    kid = secrets.token_hex(6)
    return kid, f"{KEY_PREFIX}{kid}_{secrets.token_urlsafe(32)}"


def read_keys(path: Path) -> dict[str, KeyEntry]:
    """id -> entry from the keys file; ConfigError naming the file when it is unreadable or malformed."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"'auth.keys_file' = '{path}': no such file (create keys with `mcp-appliance keys add`)") from None
    except OSError as exc:
        raise ConfigError(f"'auth.keys_file' = '{path}': cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"'auth.keys_file' = '{path}': not valid JSON: {exc}") from None
    entries: dict[str, KeyEntry] = {}
    try:
        for item in doc["keys"]:
            entry = KeyEntry(id=item["id"], principal=item["principal"], scopes=tuple(item["scopes"]),
                             sha256=item["sha256"], created=item.get("created", ""))
            if not (isinstance(entry.principal, str) and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
                    and all(isinstance(s, str) for s in entry.scopes)):
                raise TypeError
            entries[entry.id] = entry
    except (KeyError, TypeError):
        raise ConfigError(f"'auth.keys_file' = '{path}': expected {{\"keys\": [{{\"id\", \"principal\", \"scopes\", "
                          "\"sha256\"}, …]}} as written by `mcp-appliance keys add`") from None
    return entries


def write_keys(path: Path, entries: dict[str, KeyEntry], service_user: str | None) -> None:
    """Replace the keys file atomically; readable by root and the service user's group only."""
    write_secret(path, json.dumps({"keys": [e.as_json() for e in entries.values()]}, indent=2) + "\n", service_user)


def write_secret(path: Path, text: str, service_user: str | None) -> None:
    """Replace a secret file atomically (fsynced); mode 0640, the group the service user's when root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o640)
    _give_to_group(tmp, service_user)
    os.replace(tmp, path)


def _give_to_group(path: Path, service_user: str | None) -> None:
    """When root writes a secret, the service user's group may read it (the workers run as that user)."""
    if os.geteuid() != 0 or not service_user:
        return
    with contextlib.suppress(KeyError):
        os.chown(path, 0, pwd.getpwnam(service_user).pw_gid)


def add_key(path: Path, principal: str, scopes: list[str], service_user: str | None) -> tuple[KeyEntry, str]:
    """Create a key for `principal`; returns the entry and the key (shown once, never stored)."""
    if not _PRINCIPAL.match(principal):
        raise ConfigError(f"principal {principal!r}: use letters, digits and _ . @ : - (at most 128)")
    for scope in scopes:
        if not _SCOPE.match(scope):
            raise ConfigError(f"scope {scope!r}: a scope is printable ASCII without spaces, quotes or backslashes")
    entries = read_keys(path) if path.exists() else {}
    kid, key = new_key()
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = KeyEntry(id=kid, principal=principal, scopes=tuple(dict.fromkeys(scopes)), sha256=hash_key(key), created=created)
    entries[kid] = entry
    write_keys(path, entries, service_user)
    return entry, key


def revoke_key(path: Path, kid: str, service_user: str | None) -> KeyEntry:
    """Remove key `kid`; workers stop accepting it within a second."""
    entries = read_keys(path)
    if kid not in entries:
        raise ConfigError(f"no key with id {kid!r} in {path} (see `mcp-appliance keys list`)")
    entry = entries.pop(kid)
    write_keys(path, entries, service_user)
    return entry


class WatchedFile:
    """A file re-read when it changes, checked at most once per `interval` seconds (no per-request I/O)."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.checked = 0.0
        self.stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        """True when the file differs from the last time this answered True (missing counts as a state)."""
        now = time.monotonic()
        if now - self.checked < self.interval:
            return False
        self.checked = now
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self.stamp and self.stamp is not None:
            return False
        self.stamp = stamp
        return True


def admin_token_path(settings: Settings) -> Path:
    """Where the admin token lives: admin.token_file, or the one `run` generates."""
    return Path(settings.admin.token_file) if settings.admin.token_file else settings.run_dir / ADMIN_TOKEN_NAME


def read_admin_token(settings: Settings) -> str:
    """The admin token; ConfigError naming the key when there is none."""
    path = admin_token_path(settings)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"'admin.token_file' = '{settings.admin.token_file}': cannot read {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"'admin.token_file' = '{settings.admin.token_file}': the token in {path} is shorter than 16 characters")
    return token


def ensure_admin_token(settings: Settings, as_root: bool) -> Path:
    """Before start: check the configured token, or write a fresh one to <run_dir>/admin.token."""
    if settings.admin.token_file:
        read_admin_token(settings)
        return Path(settings.admin.token_file)
    path = settings.run_dir / ADMIN_TOKEN_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(tmp, 0o640)
    if as_root:
        _give_to_group(tmp, settings.user)
    os.replace(tmp, path)
    return path


def admin_headers(settings: Settings) -> dict[str, str]:
    """Headers that authorize a local CLI call to the admin app."""
    return {"Authorization": f"Bearer {read_admin_token(settings)}"}
