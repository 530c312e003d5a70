"""Token buckets that every worker of the host shares: a fixed-size table in an mmap'd file.

A client's calls spread over the workers (least_conn), and a legacy session sticks to
one, so a per-worker bucket would give a client N shares or a 1/N share. The table lives
in `<run_dir>/limits.buckets` (tmpfs in containers and under systemd), so all workers see
one bucket per key:

- the file starts with a header (magic, a random hash key chosen by whoever creates it),
  then `groups` groups of `GROUP` slots; a slot is (key hash, tokens, last refill time);
- a key (a verified principal, or a client address) hashes, with the file's own key, to
  one group; the request locks that group's bytes (fcntl record lock: released by the
  kernel if the worker dies), refills the bucket, takes a token, writes it back;
- a key not in its group takes an empty slot or the one least recently used. A bucket
  idle for burst/rate seconds is full again, so forgetting it loses nothing; the keyed
  hash keeps clients from aiming their keys at another client's group.

`time.monotonic()` is the system-wide CLOCK_MONOTONIC, the same clock in every worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from pathlib import Path

MAGIC = b"MCPBKT01"
#: magic, hash key, group count; padded to HEADER bytes.
_HEADER = struct.Struct("<8s16sQ")
HEADER = 64
#: Slots per group: the ones a key may live in.
GROUP = 8
_SLOT = struct.Struct("<Qdd8x")
SLOT = _SLOT.size  # 32 bytes
_GROUP = struct.Struct("<" + "Qdd8x" * GROUP)
GROUP_BYTES = SLOT * GROUP


class BucketsUnavailable(Exception):
    """The shared table cannot be used (the file is missing, of another layout or unwritable)."""


def buckets_path(run_dir: Path, server: str | None = None) -> Path:
    """The shared table of worker-side rate limits: limits.rate's, or that of a server with a rate of its own."""
    return run_dir / ("limits.buckets" if server is None else f"limits-{server}.buckets")


class SharedBuckets:
    """Token buckets of `rate` per second holding at most `burst` + 1 tokens, shared through `path`."""

    def __init__(self, path: Path, rate: float, burst: int, size_mb: int) -> None:
        self.rate = float(rate)
        self.capacity = float(burst + 1)
        groups = max(1, size_mb * 1024 * 1024 // GROUP_BYTES)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER, 0)
            try:
                head = os.pread(self.fd, _HEADER.size, 0)
                if len(head) < _HEADER.size or head[:8] != MAGIC:
                    # The first worker of this start: lay out the table (zeros are empty slots).
                    os.ftruncate(self.fd, HEADER + groups * GROUP_BYTES)
                    os.pwrite(self.fd, _HEADER.pack(MAGIC, os.urandom(16), groups), 0)
                    head = os.pread(self.fd, _HEADER.size, 0)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER, 0)
            _, self.hash_key, self.groups = _HEADER.unpack(head)
            if os.fstat(self.fd).st_size < HEADER + self.groups * GROUP_BYTES:
                raise BucketsUnavailable(f"{path}: shorter than its header says")
            self.map = mmap.mmap(self.fd, HEADER + self.groups * GROUP_BYTES)
        except OSError as exc:
            raise BucketsUnavailable(f"{path}: {exc.strerror or exc}") from None
        self.path = path

    def take(self, key: bytes, now: float | None = None) -> bool:
        """Take one token from `key`'s bucket: False when it is empty (the caller refuses)."""
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=8, key=self.hash_key).digest(), "little") or 1
        offset = HEADER + (digest % self.groups) * GROUP_BYTES
        fcntl.lockf(self.fd, fcntl.LOCK_EX, GROUP_BYTES, offset)
        try:
            if now is None:
                now = time.monotonic()  # read under the lock: no other worker wrote a later time
            slots = _GROUP.unpack_from(self.map, offset)
            victim, oldest = 0, float("inf")
            for k in range(GROUP):
                h, tokens, last = slots[3 * k], slots[3 * k + 1], slots[3 * k + 2]
                if h == digest:
                    tokens = min(self.capacity, tokens + (now - last) * self.rate)
                    allowed = tokens >= 1.0
                    _SLOT.pack_into(self.map, offset + k * SLOT, digest, tokens - 1.0 if allowed else tokens, now)
                    return allowed
                if h == 0:
                    last = -1.0  # an empty slot goes first
                if last < oldest:
                    victim, oldest = k, last
            _SLOT.pack_into(self.map, offset + victim * SLOT, digest, self.capacity - 1.0, now)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, GROUP_BYTES, offset)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
