"""Authentication: API keys (stored as hashes), JWTs (HS256, RS256, ES256, JWKS), mode none, the admin token."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance import keys
from appliance.config import AdminSettings, AuthSettings, ConfigError, Settings, load_settings
from appliance.gate.auth import (
    AdminGuard,
    ApiKeys,
    AuthFailure,
    JwtTokens,
    NoAuth,
    Principal,
    load_authenticator,
    load_jwt_keys,
    metadata_url,
    protected_resource_metadata,
)
from tests.harness import to_toml


def settings_with(tmp_path: Path, **auth: Any) -> Settings:
    return Settings(run_dir=tmp_path / "run", auth=AuthSettings(**auth))


# --- mode none and production -------------------------------------------------------------


def test_mode_none_is_refused_in_production_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"environment": "production"}))
    with pytest.raises(ConfigError, match="'auth.mode' = 'none' is refused.*'auth.allow_none_in_production'"):
        load_settings(path, {})


def test_mode_none_in_production_loads_when_explicitly_allowed(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"environment": "production", "auth": {"allow_none_in_production": True}}))
    assert load_settings(path, {}).auth.mode == "none"


def test_production_with_api_keys_loads(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "absent.toml", {"ENVIRONMENT": "production", "MCP_APPLIANCE_AUTH_MODE": "api_keys"})
    assert settings.auth.mode == "api_keys"


def test_mode_none_makes_everyone_anonymous_with_the_configured_scopes() -> None:
    principal = NoAuth(("notes:read",)).authenticate("whatever")
    assert principal.name == "anonymous" and principal.has("notes:read") and not principal.has("notes:write")
    assert NoAuth(("*",)).authenticate(None).has("anything")


# --- API keys -----------------------------------------------------------------------------


def test_keys_file_stores_only_a_hash_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry, key = keys.add_key(path, "agent-a", ["notes:write"], None)
    text = path.read_text()
    assert key not in text and key.split("_")[-1] not in text
    assert entry.sha256 in text and entry.sha256 == keys.hash_key(key)
    assert json.loads(text)["keys"][0]["principal"] == "agent-a"
    assert path.stat().st_mode & 0o777 == 0o640


def test_api_key_authenticates_its_principal_with_its_scopes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, key = keys.add_key(path, "agent-a", ["notes:write", "notes:read"], None)
    principal = ApiKeys(path).authenticate(key)
    assert principal.name == "agent-a" and principal.scopes == {"notes:write", "notes:read"}


@pytest.mark.parametrize("credential", [None, "", "mcpk_000000000000_" + "A" * 43, "garbage", "Bearer x"])
def test_missing_or_unknown_api_key_is_refused(tmp_path: Path, credential: str | None) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "agent-a", [], None)
    with pytest.raises(AuthFailure) as failure:
        ApiKeys(path).authenticate(credential)
    assert failure.value.reason == ("missing_credential" if credential is None else "bad_credential")


def test_a_key_with_a_known_id_but_wrong_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry, key = keys.add_key(path, "agent-a", [], None)
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert keys.key_id(forged) == entry.id
    with pytest.raises(AuthFailure):
        ApiKeys(path).authenticate(forged)


def test_revoked_key_is_refused_after_the_reload_interval(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry, key = keys.add_key(path, "agent-a", [], None)
    store = ApiKeys(path)
    store.watch.interval = 0  # check the file on every request, so the test needs no waiting
    assert store.authenticate(key).name == "agent-a"
    keys.revoke_key(path, entry.id, None)
    with pytest.raises(AuthFailure):
        store.authenticate(key)


def test_a_new_key_works_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "agent-a", [], None)
    store = ApiKeys(path)
    store.watch.interval = 0
    _, key = keys.add_key(path, "agent-b", ["x"], None)
    assert store.authenticate(key).name == "agent-b"


def test_a_broken_keys_file_refuses_every_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, key = keys.add_key(path, "agent-a", [], None)
    store = ApiKeys(path)
    store.watch.interval = 0
    path.write_text("{not json")
    with pytest.raises(AuthFailure):
        store.authenticate(key)


def test_missing_keys_file_is_a_config_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth.keys_file"):
        load_authenticator(settings_with(tmp_path, mode="api_keys", keys_file=tmp_path / "absent.json"))


def test_revoking_an_unknown_id_names_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "agent-a", [], None)
    with pytest.raises(ConfigError, match="'nope'"):
        keys.revoke_key(path, "nope", None)


@pytest.mark.parametrize(("principal", "scopes"), [("bad name", []), ("", []), ("ok", ["two words"]), ("ok", ['q"'])])
def test_keys_add_rejects_bad_principals_and_scopes(tmp_path: Path, principal: str, scopes: list[str]) -> None:
    with pytest.raises(ConfigError):
        keys.add_key(tmp_path / "keys.json", principal, scopes, None)


# --- JWT ----------------------------------------------------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef-secret"


def jwt_settings(tmp_path: Path, key_file: Path, **extra: Any) -> Settings:
    auth = {"mode": "jwt", "jwt_key_file": key_file, "jwt_issuer": "https://idp.example", "jwt_audience": "mcp", **extra}
    return settings_with(tmp_path, **auth)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "agent-j", "iss": "https://idp.example", "aud": "mcp", "exp": now + 300, "iat": now,
            "scope": "notes:read notes:write"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def hs256(tmp_path: Path) -> JwtTokens:
    key_file = tmp_path / "secret"
    key_file.write_bytes(SECRET)
    return JwtTokens(jwt_settings(tmp_path, key_file))


def test_hs256_token_gives_principal_scopes_and_issuer(hs256: JwtTokens) -> None:
    principal = hs256.authenticate(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert principal.name == "agent-j" and principal.scopes == {"notes:read", "notes:write"}
    assert principal.issuer == "https://idp.example" and principal.identity == ("https://idp.example", "agent-j")


def test_scopes_may_be_a_list_claim(tmp_path: Path) -> None:
    key_file = tmp_path / "secret"
    key_file.write_bytes(SECRET)
    tokens = JwtTokens(jwt_settings(tmp_path, key_file, jwt_scope_claim="scp"))
    token = jwt.encode(claims(scope=None, scp=["a", "b"]), SECRET, algorithm="HS256")
    assert tokens.authenticate(token).scopes == {"a", "b"}


@pytest.mark.parametrize(
    ("changes", "why"),
    # Times are offsets from the moment the test runs (collection may be long before).
    [({"exp": -120}, "expired"), ({"iss": "https://evil.example"}, "issuer"),
     ({"aud": "other"}, "audience"), ({"exp": None}, "exp"), ({"sub": None}, "sub"),
     ({"nbf": 600}, "yet valid")],
)
def test_bad_claims_are_refused(hs256: JwtTokens, changes: dict[str, Any], why: str) -> None:
    now = int(time.time())
    resolved = {k: (now + v if k in ("exp", "nbf") and v is not None else v) for k, v in changes.items()}
    with pytest.raises(AuthFailure, match=f"(?i){why}"):
        hs256.authenticate(jwt.encode(claims(**resolved), SECRET, algorithm="HS256"))


def test_clock_skew_within_leeway_is_accepted(hs256: JwtTokens) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert hs256.authenticate(token).name == "agent-j"  # leeway is 30 s


def test_token_signed_with_another_secret_is_refused(hs256: JwtTokens) -> None:
    with pytest.raises(AuthFailure, match="invalid token"):
        hs256.authenticate(jwt.encode(claims(), b"x" * 40, algorithm="HS256"))


def test_unsigned_token_is_refused(hs256: JwtTokens) -> None:
    with pytest.raises(AuthFailure):
        hs256.authenticate(jwt.encode(claims(), None, algorithm="none"))


def write_public(path: Path, private: Any) -> Path:
    path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens_verify(tmp_path: Path, kind: str) -> None:
    private = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    tokens = JwtTokens(jwt_settings(tmp_path, write_public(tmp_path / "pub.pem", private)))
    assert tokens.authenticate(jwt.encode(claims(), private, algorithm=kind)).name == "agent-j"


def test_a_public_key_cannot_be_used_as_an_hmac_secret(tmp_path: Path) -> None:
    """The classic algorithm-confusion attack: sign HS256 with the PEM text of the public key."""
    private = rsa.generate_private_key(65537, 2048)
    pem = write_public(tmp_path / "pub.pem", private)
    tokens = JwtTokens(jwt_settings(tmp_path, pem))
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims()).encode())
    forged = signing_input + b"." + b64(hmac.new(pem.read_bytes(), signing_input, hashlib.sha256).digest())
    with pytest.raises(AuthFailure):
        tokens.authenticate(forged.decode())


def test_jwks_file_selects_the_key_by_kid(tmp_path: Path) -> None:
    one, two = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(one.public_key())), "kid": "one", "alg": "ES256"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(two.public_key())), "kid": "two", "alg": "RS256"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    tokens = JwtTokens(jwt_settings(tmp_path, path))
    assert tokens.authenticate(jwt.encode(claims(sub="a"), one, algorithm="ES256", headers={"kid": "one"})).name == "a"
    assert tokens.authenticate(jwt.encode(claims(sub="b"), two, algorithm="RS256", headers={"kid": "two"})).name == "b"
    with pytest.raises(AuthFailure, match="unknown key"):
        tokens.authenticate(jwt.encode(claims(), two, algorithm="RS256", headers={"kid": "three"}))


@pytest.mark.parametrize(("content", "message"), [(b"short", "at least 32 bytes"),
                                                  (b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n", "PEM"),
                                                  (b'{"keys": []}', "JWKS")])
def test_unusable_jwt_key_files_are_config_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"auth.jwt_key_file.*{message}"):
        load_jwt_keys(path)


def test_verified_tokens_are_remembered_until_they_expire(hs256: JwtTokens) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    first = hs256.authenticate(token)
    assert hs256.authenticate(token) is first


# --- challenge and metadata ---------------------------------------------------------------


def test_metadata_url_follows_rfc9728_path_insertion(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, mode="jwt", resource_url="https://mcp.example.com/mcp")
    assert metadata_url(settings, {"headers": []}) == "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    scope = {"headers": [(b"host", b"agents.example:8443"), (b"x-forwarded-proto", b"https")]}
    derived = settings_with(tmp_path, mode="jwt")
    assert metadata_url(derived, scope) == "https://agents.example:8443/.well-known/oauth-protected-resource/mcp"


def test_resource_metadata_names_the_issuer_and_the_policy_scopes(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, mode="jwt", jwt_issuer="https://idp.example", resource_url="https://m.example/mcp")
    doc = protected_resource_metadata(settings, {"headers": []})
    assert doc["resource"] == "https://m.example/mcp"
    assert doc["authorization_servers"] == ["https://idp.example"]
    assert "notes:write" in doc["scopes_supported"]


def test_principal_is_given_to_the_sdk_as_an_authenticated_user() -> None:
    principal = Principal("agent-a", frozenset({"s"}), issuer="https://idp")
    assert principal.user.username == "agent-a"
    assert principal.user.access_token.claims == {"iss": "https://idp"}


# --- admin token --------------------------------------------------------------------------


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "headers": headers or []}, receive, send)
    return int(sent[0]["status"])


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.anyio
@pytest.mark.parametrize("environment", ["development", "production"])
async def test_admin_endpoints_need_the_admin_token(tmp_path: Path, environment: str) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("a-very-secret-admin-token\n")
    settings = Settings(environment=environment, admin=AdminSettings(token_file=str(token_file)),
                        auth=AuthSettings(allow_none_in_production=True))
    guard = AdminGuard(ok_app, settings)
    good = [(b"authorization", b"Bearer a-very-secret-admin-token")]
    assert await call(guard, "/admin/workers/0/restart") == 401
    assert await call(guard, "/admin/reload", [(b"authorization", b"Bearer a-very-secret-admin-toke")]) == 401
    assert await call(guard, "/admin/reload", good) == 200
    assert await call(guard, "/config") == (401 if environment == "production" else 200)
    assert await call(guard, "/config", good) == 200
    assert await call(guard, "/health") == 200


@pytest.mark.anyio
async def test_admin_endpoints_are_refused_when_the_token_is_unreadable(tmp_path: Path) -> None:
    settings = Settings(admin=AdminSettings(token_file=str(tmp_path / "absent")))
    assert await call(AdminGuard(ok_app, settings), "/admin/reload", [(b"authorization", b"Bearer ")]) == 401


def test_run_generates_a_private_admin_token_when_none_is_configured(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path)
    path = keys.ensure_admin_token(settings, as_root=False)
    assert path == tmp_path / "admin.token" and path.stat().st_mode & 0o777 == 0o640
    assert len(keys.read_admin_token(settings)) >= 32
    assert keys.admin_headers(settings)["Authorization"].startswith("Bearer ")


def test_configured_admin_token_must_exist(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings(run_dir=tmp_path), admin=AdminSettings(token_file=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="admin.token_file"):
        keys.ensure_admin_token(settings, as_root=False)


# --- the CLI ------------------------------------------------------------------------------


def cli(tmp_path: Path, *args: str, config: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(config or {"auth": {"mode": "api_keys", "keys_file": str(tmp_path / "keys.json")}}))
    return subprocess.run([sys.executable, "-m", "appliance", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_check_names_the_missing_keys_file(tmp_path: Path) -> None:
    result = cli(tmp_path, "check")
    assert result.returncode == 2 and "'auth.keys_file'" in result.stderr and "keys add" in result.stderr


def test_keys_cli_adds_lists_and_revokes_without_ever_listing_a_key(tmp_path: Path) -> None:
    added = cli(tmp_path, "keys", "add", "--principal", "agent-x", "--scope", "notes:write", "--scope", "a:b")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]
    assert keys.key_id(key) and "shown only now" in added.stderr
    listing = cli(tmp_path, "keys", "list")
    assert "agent-x" in listing.stdout and "notes:write a:b" in listing.stdout and key not in listing.stdout
    assert cli(tmp_path, "check").returncode == 0
    assert cli(tmp_path, "keys", "revoke", keys.key_id(key) or "").returncode == 0
    assert "agent-x" not in cli(tmp_path, "keys", "list").stdout
    refused = cli(tmp_path, "keys", "revoke", "000000000000")
    assert refused.returncode == 2 and "no key with id" in refused.stderr


# --- JWT audience (the MCP authorization spec: tokens minted for this server only) --------


def jwt_config(tmp_path: Path, environment: str, **auth: Any) -> Path:
    key_file = tmp_path / "secret"
    key_file.write_bytes(SECRET)
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml({"environment": environment, "auth": {"mode": "jwt", "jwt_key_file": str(key_file), **auth}}))
    return path


@pytest.mark.parametrize(("auth", "key", "opt_out"),
                         [({"jwt_issuer": "https://idp.example"}, "auth.jwt_audience", "auth.jwt_allow_any_audience"),
                          ({"jwt_audience": "https://mcp.example/mcp"}, "auth.jwt_issuer", "auth.jwt_allow_any_issuer")])
def test_jwt_in_production_without_audience_or_issuer_is_refused_naming_the_key(
        tmp_path: Path, auth: dict[str, Any], key: str, opt_out: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}' is empty .*'{opt_out}' = true"):
        load_settings(jwt_config(tmp_path, "production", **auth), {})


def test_jwt_in_production_loads_with_resource_url_as_audience_or_explicit_opt_outs(tmp_path: Path) -> None:
    loaded = load_settings(jwt_config(tmp_path, "production", jwt_issuer="https://idp.example",
                                      resource_url="https://mcp.example/mcp"), {})
    assert loaded.auth.resource_url == "https://mcp.example/mcp"
    opted = load_settings(jwt_config(tmp_path, "production", jwt_allow_any_audience=True, jwt_allow_any_issuer=True), {})
    assert opted.auth.jwt_allow_any_audience and opted.auth.jwt_allow_any_issuer


def test_check_fails_naming_the_audience_key_for_jwt_in_production(tmp_path: Path) -> None:
    path = jwt_config(tmp_path, "production", jwt_issuer="https://idp.example")
    result = subprocess.run([sys.executable, "-m", "appliance", "--config", str(path), "check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "'auth.jwt_audience'" in result.stderr


def test_the_resource_url_is_the_audience_when_none_is_set(tmp_path: Path) -> None:
    key_file = tmp_path / "secret"
    key_file.write_bytes(SECRET)
    tokens = JwtTokens(jwt_settings(tmp_path, key_file, jwt_audience="", resource_url="https://mcp.example/mcp"))
    assert tokens.authenticate(jwt.encode(claims(aud="https://mcp.example/mcp"), SECRET, algorithm="HS256")).name
    with pytest.raises(AuthFailure, match="(?i)audience"):
        tokens.authenticate(jwt.encode(claims(aud="https://other-service.example"), SECRET, algorithm="HS256"))


def test_jwt_without_audience_outside_production_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "secret"
    key_file.write_bytes(SECRET)
    with caplog.at_level("WARNING", logger="appliance.auth"):
        tokens = JwtTokens(jwt_settings(tmp_path, key_file, jwt_audience=""))
    assert any("auth.jwt_audience is empty" in r.getMessage() for r in caplog.records)
    # and it is true: a token minted for another service is accepted
    assert tokens.authenticate(jwt.encode(claims(aud="https://other-service.example"), SECRET, algorithm="HS256")).name
    caplog.clear()
    with caplog.at_level("WARNING", logger="appliance.auth"):
        JwtTokens(jwt_settings(tmp_path, key_file))
    assert not caplog.records
