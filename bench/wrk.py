"""wrk (Debian's package) with generated Lua scripts for the three kinds of MCP traffic.

- "modern": self-contained 2026-07-28 tools/call POSTs;
- "stateless": legacy (2025-11-25) tools/call POSTs to a server without sessions;
- "sessions": per connection, `initialize` and `notifications/initialized` once, then
  tools/call inside that session (wrk runs one thread per connection here, so the Lua
  state of a thread is the state of its connection).

Every script counts answers that are not a successful tool result and prints its figures
as one JSON line from done(), so nothing depends on wrk's human-readable summary.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEGACY = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"


@dataclass(frozen=True)
class Figures:
    """One wrk run."""

    kind: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    #: Socket errors, non-2xx answers and answers that were not a successful tool result.
    errors: int
    rate: float | None = None  # requests/s per connection asked for (None: as fast as possible)
    #: The errors by kind: "socket N, answers M" (answers: non-2xx or not a successful tool result).
    detail: str = ""
    #: Over several runs (see median): the lowest and highest req/s.
    rps_range: tuple[float, float] | None = None
    #: CPU microseconds per request by process group ("workers", "nginx", "other", "wrk"), when measured.
    cpu_us: dict[str, float] | None = None

    def row(self) -> dict[str, Any]:
        return {"rps": round(self.rps), "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2),
                "errors": self.errors}


def median(runs: list[Figures]) -> Figures:
    """The median of each figure over several runs of the same load; errors summed."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    return dataclasses.replace(
        runs[0], seconds=sum(r.seconds for r in runs), requests=sum(r.requests for r in runs),
        rps=mid([r.rps for r in runs]), p50_ms=mid([r.p50_ms for r in runs]), p90_ms=mid([r.p90_ms for r in runs]),
        p99_ms=mid([r.p99_ms for r in runs]), errors=sum(r.errors for r in runs),
        rps_range=(min(r.rps for r in runs), max(r.rps for r in runs)),
        cpu_us=_median_cpu([r.cpu_us for r in runs]),
    )


def _median_cpu(runs: list[dict[str, float] | None]) -> dict[str, float] | None:
    """CPU per request by process group, the median over runs that measured it (None if any did not)."""
    measured = [r for r in runs if r]
    if len(measured) != len(runs) or not measured:
        return None
    return {group: statistics.median(r[group] for r in measured) for group in measured[0]}


def _lua_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here (ASCII)


def _headers(extra: dict[str, str]) -> str:
    pairs = {"Content-Type": "application/json", "Accept": ACCEPT, **extra}
    return "{" + ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in pairs.items()) + "}"


_COMMON = """
bad = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
local pause = 0
function init(args) if args[1] then pause = tonumber(args[1]) end end
function delay() return pause end
local function check(status, body)
  if status ~= 200 or not string.find(body, SUCCESS, 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'FIGURES {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"socket_errors":%d,"status_errors":%d,"bad":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(90.0),
    latency:percentile(99.0), e.connect + e.read + e.write + e.timeout, e.status, total))
end
"""


def _call(tool: str, arguments: dict[str, Any], meta: bool) -> str:
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    if meta:
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
        }
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}, separators=(",", ":"))


#: What a successful tool result's body holds (the Python SDK always writes isError).
SUCCESS = '"isError":false'


def script(kind: str, tool: str, arguments: dict[str, Any], headers: Mapping[str, str] | None = None,
           success: str = SUCCESS) -> str:
    """The Lua script for one kind of traffic; `headers` go with every request (e.g. Authorization);
    an answer counts as a success when its body holds `success`."""
    extra = dict(headers or {})
    common = f"SUCCESS = {_lua_str(success)}\n" + _COMMON
    if kind == "modern":
        lua_headers = _headers({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool, **extra})
        return common + f"""
wrk.method = "POST"
wrk.body = {_lua_str(_call(tool, arguments, meta=True))}
wrk.headers = {lua_headers}
function response(status, headers, body) check(status, body) end
"""
    if kind == "stateless":
        lua_headers = _headers({"MCP-Protocol-Version": LEGACY, **extra})
        return common + f"""
wrk.method = "POST"
wrk.body = {_lua_str(_call(tool, arguments, meta=False))}
wrk.headers = {lua_headers}
function response(status, headers, body) check(status, body) end
"""
    if kind == "sessions":
        initialize = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}})
        initialized = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return common + f"""
local state, sid = 0, nil
local base = {_headers({"MCP-Protocol-Version": LEGACY, **extra})}
local function with_session()
  local h = {{}}
  for k, v in pairs(base) do h[k] = v end
  h["Mcp-Session-Id"] = sid
  return h
end
function request()
  if state == 0 then return wrk.format("POST", nil, base, {_lua_str(initialize)}) end
  if state == 1 then return wrk.format("POST", nil, with_session(), {_lua_str(initialized)}) end
  return wrk.format("POST", nil, with_session(), {_lua_str(_call(tool, arguments, meta=False))})
end
function response(status, headers, body)
  if state == 0 then
    sid = headers["mcp-session-id"] or headers["Mcp-Session-Id"]
    if status == 200 and sid then state = 1 else bad = bad + 1 end
  elseif state == 1 then
    if status == 202 then state = 2 else bad = bad + 1 end
  else
    check(status, body)
  end
end
"""
    raise ValueError(f"unknown traffic kind {kind!r}")


def run(url: str, kind: str, seconds: float, connections: int, tool: str, arguments: dict[str, Any],
        rate: float | None = None, threads: int = 2, headers: Mapping[str, str] | None = None,
        success: str = SUCCESS, prefix: tuple[str, ...] = ()) -> Figures:
    """One wrk run; `rate` (requests/s per connection) makes it a paced, moderate load; `headers`
    are sent with every request besides the MCP ones (credentials); `prefix` runs wrk through
    another command (e.g. nsenter into a network namespace)."""
    if kind == "sessions":
        threads = connections  # one connection per thread: per-thread Lua state = per-connection session
    threads = min(threads, connections)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.lua"
        path.write_text(script(kind, tool, arguments, headers, success))
        argv = [*prefix, "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
                "-s", str(path), url]
        if rate:
            argv += ["--", str(int(1000 / rate))]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    line = next((line for line in out.splitlines() if line.startswith("FIGURES ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no figures:\n{out}")
    f = json.loads(line.removeprefix("FIGURES "))
    duration = f["duration_us"] / 1e6
    return Figures(
        kind=kind, connections=connections, seconds=duration, requests=f["requests"],
        rps=f["requests"] / duration, p50_ms=f["p50_us"] / 1000, p90_ms=f["p90_us"] / 1000, p99_ms=f["p99_us"] / 1000,
        # `bad` counts every answer that is not a successful tool result (non-2xx included).
        errors=f["socket_errors"] + f["bad"], rate=rate, detail=f"socket {f['socket_errors']}, answers {f['bad']}",
    )
