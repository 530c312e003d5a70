"""A small client for supervisord's XML-RPC interface over its unix socket."""

from __future__ import annotations

import os
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport


class SupervisorUnavailable(Exception):
    """supervisord does not answer on its socket."""


@dataclass(frozen=True)
class ProcessInfo:
    """One supervised process as supervisord sees it."""

    name: str  # "group:name" for grouped processes, else the program name
    group: str
    state: str
    pid: int
    uptime: float
    exitstatus: int
    description: str

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        """Build from one entry of getAllProcessInfo."""
        full = info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"
        uptime = float(info["now"] - info["start"]) if info["statename"] == "RUNNING" else 0.0
        return cls(full, info["group"], info["statename"], info["pid"], uptime, info["exitstatus"], info["description"])


def nudge_when_up(sock: Path, deadline: float = 10.0) -> None:
    """From a child forked before exec'ing supervisord: make one request once its socket answers.

    supervisord starts its programs on the first pass of its main loop, which waits up to a
    second for I/O; an early request wakes that loop, so the programs start a second sooner.
    Exits the (forked) process in every case.
    """
    try:
        client = SupervisorClient(sock)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                client.state()
                break
            except SupervisorUnavailable:
                time.sleep(0.02)
    finally:
        os._exit(0)


def worker_program(index: int) -> str:
    """supervisord's name for worker `index`: one program (and process group) per worker."""
    return f"worker-{index:02d}"


def socket_path(run_dir: Path) -> Path:
    """Where the rendered supervisord.conf puts the control socket."""
    return run_dir / "supervisor.sock"


class SupervisorClient:
    """Blocking XML-RPC calls; use from a thread in async code."""

    def __init__(self, sock: Path) -> None:
        self.serverurl = f"unix://{sock}"

    def _proxy(self) -> Any:
        # A proxy per call: the transport keeps one connection and is not thread-safe.
        transport = SupervisorTransport(None, None, serverurl=self.serverurl)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _call(self, method: str, *args: Any) -> Any:
        proxy = self._proxy()
        try:
            return getattr(proxy.supervisor, method)(*args)
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorUnavailable(f"supervisord at {self.serverurl}: {exc}") from None

    def processes(self) -> list[ProcessInfo]:
        """Every supervised process."""
        return [ProcessInfo.from_rpc(i) for i in self._call("getAllProcessInfo")]

    def state(self) -> str:
        """supervisord's own state, e.g. RUNNING or SHUTDOWN."""
        return str(self._call("getState")["statename"])

    def pid(self) -> int:
        """supervisord's pid."""
        return int(self._call("getPID"))

    def start(self, name: str, wait: bool = True) -> bool:
        """Start one process ("group:name")."""
        return bool(self._call("startProcess", name, wait))

    def stop(self, name: str, wait: bool = True) -> bool:
        """Stop one process ("group:name")."""
        return bool(self._call("stopProcess", name, wait))

    def signal(self, name: str, sig: str) -> bool:
        """Send a signal (e.g. "HUP") to one process."""
        return bool(self._call("signalProcess", name, sig))

    def process(self, name: str) -> ProcessInfo:
        """One process ("group:name" or a program's name)."""
        return ProcessInfo.from_rpc(self._call("getProcessInfo", name))

    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read supervisord.conf; (added, changed, removed) group names. Starts and stops nothing."""
        added, changed, removed = self._call("reloadConfig")[0]
        return list(added), list(changed), list(removed)

    def add_group(self, name: str) -> bool:
        """Activate a group that reload_config reported as added (its autostart programs start)."""
        return bool(self._call("addProcessGroup", name))

    def remove_group(self, name: str) -> bool:
        """Forget a group whose processes are all stopped."""
        return bool(self._call("removeProcessGroup", name))

    def shutdown(self) -> None:
        """Stop every process and supervisord itself."""
        self._call("shutdown")
