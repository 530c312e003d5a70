"""Who is calling: API keys, JWTs or nobody (mode "none"), and the admin token of the admin app.

The `Authenticate` layer turns the request's credential into a `Principal` (name,
scopes, issuer) or answers 401 with `WWW-Authenticate`. It also sets `scope["user"]`
to the SDK's `AuthenticatedUser`, so an `MCPServer` binds its sessions to the same
principal the gate does.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Protocol

from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import keys
from appliance.config import ConfigError, Settings
from appliance.gate.exchange import Exchange, exchange, flag
from appliance.gate.jsonrpc import RpcError, call_from_headers, parse_body, read_body
from appliance.gate.requests import principal_name
from appliance.gate.responses import header, send_rpc_error

logger = logging.getLogger("appliance.auth")

UNAUTHORIZED = -32001
#: A refused request's body is read for its audit record (method, name, id) up to this size.
RECORDED_BODY_LIMIT = 64 * 1024
ANONYMOUS = "anonymous"
WELL_KNOWN = "/.well-known/oauth-protected-resource"


class Principal:
    """An authenticated caller: its name, scopes and (for JWTs) issuer."""

    __slots__ = ("name", "scopes", "issuer", "identity", "user", "everything", "expires")

    def __init__(self, name: str, scopes: frozenset[str], issuer: str | None = None, expires: float | None = None) -> None:
        self.name = name
        self.scopes = scopes
        self.issuer = issuer
        #: What a session is bound to: the same name from another issuer is someone else.
        self.identity = (issuer or "", name)
        self.everything = "*" in scopes
        self.expires = expires
        # Imported here: the SDK, PyJWT and cryptography weigh ~45 MiB, and the admin app, which
        # only needs AdminGuard from this module, should not carry them.
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken

        claims = {"iss": issuer} if issuer else None
        token = AccessToken(token="", client_id=name, scopes=sorted(scopes), subject=name, claims=claims,
                            expires_at=int(expires) if expires else None)
        self.user = AuthenticatedUser(token)

    def has(self, scope: str) -> bool:
        """Whether this principal holds `scope` ("*" holds every scope)."""
        return self.everything or scope in self.scopes

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, scopes={sorted(self.scopes)!r}, issuer={self.issuer!r})"


class AuthFailure(Exception):
    """No usable credential: `reason` is missing_credential or bad_credential."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class Authenticator(Protocol):
    """Turns a bearer credential (None when the request has none) into a Principal."""

    def authenticate(self, credential: str | None) -> Principal: ...


class NoAuth:
    """Mode "none": every caller is `anonymous` with auth.anonymous_scopes."""

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self.principal = Principal(ANONYMOUS, frozenset(scopes))

    def authenticate(self, credential: str | None) -> Principal:
        return self.principal


class ApiKeys:
    """Mode "api_keys": keys from auth.keys_file, re-read within a second of a change."""

    def __init__(self, path: Path) -> None:
        self.watch = keys.WatchedFile(path)
        self.by_id: dict[str, tuple[keys.KeyEntry, Principal]] = {}
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> None:
        """Load the file; a broken or missing file means no key is accepted (fail closed)."""
        self.watch.changed()
        try:
            entries = keys.read_keys(self.watch.path)
        except ConfigError as exc:
            if strict:
                raise
            logger.error("API keys unusable, refusing every key until fixed: %s", exc)
            entries = {}
        self.by_id = {kid: (e, Principal(e.principal, frozenset(e.scopes))) for kid, e in entries.items()}
        logger.info("API keys loaded: %d keys from %s", len(self.by_id), self.watch.path)

    def authenticate(self, credential: str | None) -> Principal:
        if credential is None:
            raise AuthFailure("missing_credential", "an API key is required")
        if self.watch.changed():
            self.reload()
        kid = keys.key_id(credential)
        found = self.by_id.get(kid) if kid else None
        if found is None or not keys.matches(found[0], credential):
            raise AuthFailure("bad_credential", "unknown or revoked API key")
        return found[1]


class JwtTokens:
    """Mode "jwt": signed tokens checked with PyJWT; verified tokens are remembered until they expire."""

    CACHE_SIZE = 4096

    def __init__(self, settings: Settings) -> None:
        a = settings.auth
        self.issuer = a.jwt_issuer or None
        # The MCP authorization spec: the audience is this server's canonical URL (RFC 8707).
        self.audience = a.jwt_audience or a.resource_url or None
        if self.audience is None and not a.jwt_allow_any_audience:
            logger.warning("auth.jwt_audience is empty: JWTs minted for any audience (any other service) are "
                           "accepted; set auth.jwt_audience or auth.resource_url (production refuses to start so)")
        if self.issuer is None and not a.jwt_allow_any_issuer:
            logger.warning("auth.jwt_issuer is empty: JWTs from any issuer the key verifies are accepted; set "
                           "auth.jwt_issuer (production refuses to start so)")
        self.leeway = a.jwt_leeway
        self.principal_claim = a.jwt_principal_claim
        self.scope_claim = a.jwt_scope_claim
        self.keys = load_jwt_keys(a.jwt_key_file)
        self.cache: dict[str, Principal] = {}
        required = ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        self.options: Any = {"require": required, "verify_aud": self.audience is not None}

    def authenticate(self, credential: str | None) -> Principal:
        if credential is None:
            raise AuthFailure("missing_credential", "a bearer token is required")
        cached = self.cache.get(credential)
        if cached is not None and cached.expires is not None and time.time() <= cached.expires + self.leeway:
            return cached
        principal = self._verify(credential)
        if len(self.cache) >= self.CACHE_SIZE:
            self.cache.clear()  # cheap bound; verified tokens come back on their next use
        self.cache[credential] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        import jwt  # see Principal: only workers in mode "jwt" need it

        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key, algorithm = self.keys.get(kid) or self.keys.get(None) or (None, None)
            if key is None:
                raise AuthFailure("bad_credential", "token signed with an unknown key")
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, options=self.options)
        except jwt.ExpiredSignatureError:
            raise AuthFailure("bad_credential", "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthFailure("bad_credential", f"invalid token: {exc}") from None
        name = claims.get(self.principal_claim)
        if not isinstance(name, str) or not name:
            raise AuthFailure("bad_credential", f"token has no '{self.principal_claim}' claim")
        raw = claims.get(self.scope_claim, [])
        scopes = raw.split() if isinstance(raw, str) else [s for s in raw if isinstance(s, str)] if isinstance(raw, list) else []
        return Principal(name, frozenset(scopes), issuer=claims.get("iss") if isinstance(claims.get("iss"), str) else None,
                         expires=float(claims["exp"]))


def load_jwt_keys(path: Path) -> dict[str | None, tuple[Any, str]]:
    """kid -> (verification key, its one algorithm) from a JWKS, a PEM public key or an HS256 secret.

    Each key allows exactly one algorithm, so a public key can never be used as an HMAC secret.
    """
    import jwt  # see Principal: only workers in mode "jwt" need these
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    where = f"'auth.jwt_key_file' = '{path}'"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if data.lstrip().startswith(b"{"):
        try:
            jwks = jwt.PyJWKSet.from_json(data.decode())
        except (jwt.PyJWTError, ValueError) as exc:
            raise ConfigError(f"{where}: not a usable JWKS document: {exc}") from None
        found = {k.key_id: (k.key, k.algorithm_name) for k in jwks.keys if k.algorithm_name in {"RS256", "ES256", "HS256"}}
        if not found:
            raise ConfigError(f"{where}: the JWKS holds no RS256, ES256 or HS256 key")
        if len(found) == 1:
            found[None] = next(iter(found.values()))  # tokens without kid use the only key
        return found
    if b"-----BEGIN" in data:
        try:
            public = load_pem_public_key(data)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected a PEM public key (not a private key or certificate): {exc}") from None
        if isinstance(public, rsa.RSAPublicKey):
            return {None: (public, "RS256")}
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            return {None: (public, "ES256")}
        raise ConfigError(f"{where}: the key is neither RSA (RS256) nor EC P-256 (ES256)")
    secret = data.strip()
    if len(secret) < 32:
        raise ConfigError(f"{where}: an HS256 secret must be at least 32 bytes")
    return {None: (secret, "HS256")}


def load_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for auth.mode; ConfigError when its files are missing or unusable."""
    mode = settings.auth.mode
    if mode == "api_keys":
        return ApiKeys(settings.auth.keys_file)
    if mode == "jwt":
        return JwtTokens(settings)
    return NoAuth(settings.auth.anonymous_scopes)


def metadata_url(settings: Settings, scope: Scope) -> str:
    """The URL of this resource's OAuth protected-resource metadata (RFC 9728)."""
    parts = urlsplit(resource_url(settings, scope))
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path}"


def resource_url(settings: Settings, scope: Scope) -> str:
    """The public URL of the MCP endpoint: auth.resource_url, else the request's scheme and Host."""
    if settings.auth.resource_url:
        return settings.auth.resource_url
    headers = dict(scope["headers"])
    proto = headers.get(b"x-forwarded-proto", b"http").decode("latin-1")
    host = headers.get(b"host", b"localhost").decode("latin-1")
    return f"{'https' if proto == 'https' else 'http'}://{host}{settings.mcp.path}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', "'") + '"'


class Authenticate:
    """401 for a request without a valid credential; otherwise notes who is calling."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, settings: Settings, path: str | None = None) -> None:
        self.app = app
        self.authenticator = authenticator
        self.settings = settings
        #: The MCP path of the server this gate is in front of (default: mcp.path).
        self.path = (path or settings.mcp.path).rstrip("/")
        self.open = isinstance(authenticator, NoAuth)
        self.key_header = settings.auth.api_key_header.lower().encode()
        self.jwt = settings.auth.mode == "jwt"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = exchange(scope)
        try:
            principal = self.authenticator.authenticate(None if self.open else self._credential(scope))
        except AuthFailure as failure:
            if failure.reason == "bad_credential":
                flag(scope, "bad_credential")
            elif ex is not None:
                ex.denied = failure.reason
            if ex is not None:
                ex.authz = ("denied", failure.reason)
                await self._note_call(scope, receive, ex)
            await self._refuse(scope, send, failure)
            return
        if ex is not None:
            ex.principal = principal
            ex.authz = ("allowed", "authenticated")
        if not self.open:
            scope["user"] = principal.user
            scope["auth"] = AuthCredentials(sorted(principal.scopes))
        token = principal_name.set(principal.name)
        try:
            await self.app(scope, receive, send)
        finally:
            principal_name.reset(token)

    async def _note_call(self, scope: Scope, receive: Receive, ex: Exchange) -> None:
        """For the record of a refused call: its method, name and id, from a small JSON body or the headers."""
        path = self.path
        length = header(scope["headers"], b"content-length")
        if (scope["method"] == "POST" and (scope["path"] == path or scope["path"].startswith(path + "/"))
                and length is not None and length.isdigit() and int(length) <= RECORDED_BODY_LIMIT):
            body = await read_body(receive)
            if body is not None:
                try:
                    ex.rpc = parse_body(body)
                    return
                except RpcError:
                    pass
        ex.rpc = call_from_headers(scope["headers"])

    def _credential(self, scope: Scope) -> str | None:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credential = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not credential.strip():
                    raise AuthFailure("bad_credential", "use 'Authorization: Bearer <credential>'")
                return credential.strip()
            if key == self.key_header:
                return value.decode("latin-1").strip()
        return None

    async def _refuse(self, scope: Scope, send: Send, failure: AuthFailure) -> None:
        params = ['realm="mcp"']
        if failure.reason == "bad_credential":
            params += ['error="invalid_token"', f"error_description={_quoted(failure.description)}"]
        if self.jwt:
            params.append(f"resource_metadata={_quoted(metadata_url(self.settings, scope))}")
        challenge = ("Bearer " + ", ".join(params)).encode("latin-1", "replace")
        rpc = ex.rpc if (ex := exchange(scope)) is not None else None
        await send_rpc_error(send, 401, UNAUTHORIZED, f"Unauthorized: {failure.description}",
                             rpc.id if rpc is not None else None, headers=[(b"www-authenticate", challenge)])


def protected_resource_metadata(settings: Settings, scope: Scope) -> dict[str, Any]:
    """The RFC 9728 document that tells OAuth clients where to get a token for this resource."""
    doc: dict[str, Any] = {
        "resource": resource_url(settings, scope),
        "bearer_methods_supported": ["header"],
        "resource_name": settings.service_name,
    }
    if settings.auth.jwt_issuer:
        doc["authorization_servers"] = [settings.auth.jwt_issuer]
    scopes = sorted({s for rule in settings.policy.rules for s in rule.split("=", 1)[1].split()})
    if scopes:
        doc["scopes_supported"] = scopes
    return doc


class AdminGuard:
    """The admin token for /admin/* (and /config when environment = production), compared in constant time."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.protect_config = settings.environment == "production"
        self.watch = keys.WatchedFile(keys.admin_token_path(settings))
        self.token: bytes | None = None

    def _current(self) -> bytes | None:
        if self.watch.changed():
            try:
                self.token = keys.read_admin_token(self.settings).encode()
            except ConfigError as exc:
                logger.error("admin token unavailable, refusing admin requests: %s", exc)
                self.token = None
        return self.token

    def protects(self, path: str) -> bool:
        return path.startswith("/admin/") or path == "/admin" or (self.protect_config and path == "/config")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = self._current()
        offered = b""
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                offered = value[7:].strip()
        state = scope.setdefault("state", {})
        if token is None or not hmac.compare_digest(offered, token):
            state["admin_principal"] = None
            body = json.dumps({"error": "unauthorized", "detail": "this endpoint requires the admin token "
                               "(Authorization: Bearer <token from admin.token_file or <run_dir>/admin.token>)"}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="mcp-appliance-admin"')]})
            await send({"type": "http.response.body", "body": body})
            return
        state["admin_principal"] = "admin"
        await self.app(scope, receive, send)
