"""Bounded floods of plain GETs and probe timings taken meanwhile (the /metrics flood test and bench)."""

from __future__ import annotations

import threading
import time

from tests.harness import http


def paced_gets(url: str, rate: float, seconds: float) -> tuple[int, int]:
    """`rate` GETs of `url` per second for `seconds`, each on its own thread: (answered 200, sent).

    Open loop, like clients that do not wait for each other: above what the server answers,
    its queue grows, which is what a flood does.
    """
    ok = sent = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal ok
        try:
            status = http("GET", url, timeout=30)[0]
        except OSError:
            return
        if status == 200:
            with lock:
                ok += 1

    threads = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        thread = threading.Thread(target=one, daemon=True)
        thread.start()
        threads.append(thread)
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    for thread in threads:
        thread.join(60)
    return ok, sent


def time_probes(base: str, paths: tuple[str, ...], stop: threading.Event,
                out: dict[str, list[float]], failed: list[str]) -> None:
    """GET each of `paths` every 100 ms until `stop`; seconds per answer in `out`, non-200s in `failed`."""
    while not stop.is_set():
        for path in paths:
            started = time.perf_counter()
            try:
                status = http("GET", base + path, timeout=10)[0]
            except OSError as exc:
                failed.append(f"{path}: {exc!r}")
                continue
            out.setdefault(path, []).append(time.perf_counter() - started)
            if status != 200:
                failed.append(f"{path}: {status}")
        stop.wait(0.1)
