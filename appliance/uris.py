"""Canonical URIs (RFC 3986 §6.2.2 syntax-based normalisation, §6.2.3 for http(s) and ws(s)).

Scheme and host in lower case, percent-encoded unreserved characters decoded, other escapes
in upper-case hex, dot segments removed, default ports and empty http paths normalised, and
characters a URI cannot hold percent-encoded as UTF-8 (RFC 3987 §3.1): `notes://%31`,
`NOTES://1` and `notes://1/./..` all become `notes://1`. Policy rules and the URIs they are
matched against are both brought to this form.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Characters a URI may hold literally (unreserved, gen-delims, sub-delims); "%" is handled apart.
_URI_CHARS = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=")
_HEX = "0123456789ABCDEFabcdef"
#: RFC 3986 Appendix B, with the scheme held to its grammar (ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )).
_PARTS = re.compile(r"^(?:([A-Za-z][A-Za-z0-9+.-]*):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", re.DOTALL)
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _escapes(text: str) -> str:
    """Percent-escapes normalised: unreserved ones decoded, the rest upper-case; stray bytes encoded."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%" and i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX:
            decoded = chr(int(text[i + 1 : i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + text[i + 1 : i + 3].upper())
            i += 3
            continue
        if ch in _URI_CHARS:
            out.append(ch)
        else:  # "%" not starting an escape, spaces, controls, non-ASCII: their UTF-8 bytes, escaped
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    out: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if out:
                out.pop()
        elif path == "/..":
            path = "/"
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            out.append(path[:end])
            path = path[end:]
    return "".join(out)


def _normalised_once(uri: str) -> str:
    match = _PARTS.match(uri)
    assert match is not None  # every group is optional: any string matches
    scheme, authority, path, query, fragment = match.groups()
    scheme = scheme.lower() if scheme else None
    out = f"{scheme}:" if scheme else ""
    if authority is not None:
        userinfo, at, hostport = authority.rpartition("@")
        host, port = hostport, None
        bracket = hostport.rfind("]")
        colon = hostport.rfind(":")
        if colon > bracket and re.fullmatch(r"[0-9]*", hostport[colon + 1 :]):
            host, port = hostport[:colon], hostport[colon + 1 :]
        host = _escapes(host)
        # Host names are case-insensitive; upper-case escapes in them stay upper-case (§6.2.2.1).
        host = re.sub(r"[^%]+|%[0-9A-F]{2}", lambda m: m[0] if m[0].startswith("%") else m[0].lower(), host)
        if port is not None:
            port = str(int(port)) if port else ""
            if not port or _DEFAULT_PORTS.get(scheme or "") == port:
                port = None
        out += "//" + (_escapes(userinfo) + "@" if at else "") + host + (f":{port}" if port is not None else "")
    path = _escapes(path)
    if scheme or authority is not None:
        path = _remove_dot_segments(path)
    if authority is not None and not path and scheme in _DEFAULT_PORTS:
        path = "/"
    out += path
    if query is not None:
        out += "?" + _escapes(query)
    if fragment is not None:
        out += "#" + _escapes(fragment)
    return out


def canonical_uri(uri: str) -> str:
    """The RFC 3986 normal form of `uri` (see the module docstring); idempotent."""
    # Decoding can complete a scheme ("%6Eotes://1"): normalise again until nothing changes.
    for _ in range(4):
        again = _normalised_once(uri)
        if again == uri:
            break
        uri = again
    return uri
