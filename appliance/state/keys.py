"""The request-state key ring: the secret every worker and host seals multi-round-trip state with.

The file (`state.keys_file`) holds one secret per line: the first line seals, every line
unseals (the SDK's `RequestStateSecurity(keys=[...])` ring). Lines starting with `#` are
comments; the rotation writes its phase there (`# phase: verify` / `# phase: mint since=<epoch>`)
so an interrupted rotation resumes where it stopped. The secrets are never logged, shown
in /config or put in metrics: only their fingerprints (the SDK's key ids) are.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.config import ConfigError, Settings
from appliance.keys import write_secret

#: The SDK's minimum secret length (mcp/server/request_state.py).
MIN_SECRET_BYTES = 32
_PHASE = re.compile(r"^#\s*phase:\s*(verify|mint)(?:\s+since=(\d+(?:\.\d+)?))?\s*$")


@dataclass(frozen=True)
class Ring:
    """The secrets in order (the first seals) and the rotation phase the file records."""

    secrets: tuple[str, ...]
    phase: str = ""  # "", "verify" (a new key is being rolled out as verifier) or "mint"
    since: float = 0.0  # when the phase "mint" was fully rolled out (epoch seconds)

    def as_bytes(self) -> list[bytes]:
        return [s.encode() for s in self.secrets]

    def fingerprints(self) -> list[str]:
        """Non-secret ids of the keys, as the SDK's tokens carry them (for logs and output)."""
        return [fingerprint(s) for s in self.secrets]

    def text(self) -> str:
        lines = ["# mcp-appliance request-state keys: the first line seals, every line unseals. Secret."]
        if self.phase:
            lines.append(f"# phase: {self.phase}" + (f" since={self.since:.0f}" if self.since else ""))
        return "\n".join([*lines, *self.secrets]) + "\n"


def fingerprint(secret: str) -> str:
    """The 4-byte key id the SDK's AES-GCM codec derives for `secret`, as hex."""
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"mcp/request-state/v1/aes-256-gcm").derive(secret.encode())
    return hashlib.sha256(b"mcp/request-state/v1/kid:" + key).digest()[:4].hex()


def new_secret() -> str:
    """A fresh secret: 256 random bits as hex."""
    return secrets.token_hex(MIN_SECRET_BYTES)


def parse_ring(text: str, where: str) -> Ring:
    """The ring in a keys file's text; ConfigError naming `where` (never quoting a secret)."""
    found: list[str] = []
    phase, since = "", 0.0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if match := _PHASE.match(line):
                phase, since = match[1], float(match[2] or 0)
            continue
        if len(line.encode()) < MIN_SECRET_BYTES or " " in line:
            raise ConfigError(f"{where}: line {number} is not a key: expected at least {MIN_SECRET_BYTES} characters "
                              "without spaces (generate one with `openssl rand -hex 32`)")
        if line in found:
            raise ConfigError(f"{where}: line {number} repeats an earlier key")
        found.append(line)
    if not found:
        raise ConfigError(f"{where}: holds no key (one secret per line; generate one with `openssl rand -hex 32`)")
    return Ring(tuple(found), phase, since)


def _where(settings: Settings) -> str:
    return f"'state.keys_file' = '{settings.state.keys_file}' ({settings.state_keys_path})"


def read_ring(settings: Settings) -> Ring:
    """The ring the workers use; ConfigError naming the key when missing, unreadable, malformed or open to all."""
    path = settings.state_keys_path
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{_where(settings)}: no such file (`mcp-appliance run` generates it when state.keys_file "
                          "is empty; a fleet shares one ring, see the README)") from None
    except OSError as exc:
        raise ConfigError(f"{_where(settings)}: cannot read: {exc.strerror}") from None
    if st.st_mode & 0o007:
        raise ConfigError(f"{_where(settings)}: readable by every user (mode {st.st_mode & 0o777:04o}); "
                          f"it is a secret: chmod 0640 {path}")
    return parse_ring(text, _where(settings))


def write_ring(settings: Settings, ring: Ring, as_root: bool) -> None:
    """Replace the ring file atomically (0640, the service user's group when root)."""
    try:
        write_secret(settings.state_keys_path, ring.text(), settings.user if as_root else None)
    except OSError as exc:
        raise ConfigError(f"{_where(settings)}: cannot write: {exc.strerror}") from None


def ensure_ring(settings: Settings, as_root: bool) -> Ring:
    """Before start: the ring that exists, or a new one-key ring when the file is missing (first start)."""
    if not settings.state_keys_path.exists():
        ring = Ring((new_secret(),))
        write_ring(settings, ring, as_root)
        return ring
    return read_ring(settings)

