"""Rotating the request-state ring on one host without failing a multi-round-trip call.

The SDK's three phases, each rolled out to every worker (a drained rolling reload) before
the next begins:
  1. verify: [OLD, NEW]  every worker accepts NEW; OLD still seals;
  2. mint:   [NEW, OLD]  NEW seals; state sealed under OLD still unseals;
  3. retire: [NEW]       one request_ttl after phase 2 was everywhere: nothing sealed under OLD
                         is still valid.
During phase 1's roll-out some workers know only OLD, but all of them seal with OLD; during
phase 2's, some seal with NEW, and every worker already accepts it. The file records the phase,
so an interrupted rotation resumes where it stopped (running the same command again).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.config import ConfigError, Settings
from appliance.state.keys import Ring, new_secret, read_ring, write_ring


def rotate(settings: Settings, reload: Callable[[], None], note: Callable[[str], None], as_root: bool,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time) -> Ring:
    """Take the ring through the remaining phases; returns the final one-key ring."""

    def roll(ring: Ring) -> Ring:
        # `since` in the file: when the phase was on every worker (0: written, roll-out not known done).
        write_ring(settings, Ring(ring.secrets, ring.phase), as_root)
        reload()
        done = Ring(ring.secrets, ring.phase, clock())
        write_ring(settings, done, as_root)
        return done

    ring = read_ring(settings)
    if not ring.phase:
        if len(ring.secrets) != 1:
            raise ConfigError(f"'state.keys_file' ({settings.state_keys_path}) holds {len(ring.secrets)} keys and no "
                              "rotation phase: finish the rotation that put them there, or keep only the key that seals")
        ring = Ring((ring.secrets[0], new_secret()), "verify")
        note(f"phase 1/3: every worker verifies the new key {ring.fingerprints()[1]} (key {ring.fingerprints()[0]} seals)")
        ring = roll(ring)
    if ring.phase == "verify":
        if not ring.since:  # resumed: phase 1 must be everywhere before anything seals with NEW
            ring = roll(ring)
        ring = Ring((ring.secrets[1], ring.secrets[0]), "mint")
        note(f"phase 2/3: the new key {ring.fingerprints()[0]} seals; {ring.fingerprints()[1]} still verifies")
        ring = roll(ring)
    if ring.phase == "mint":
        if not ring.since:  # resumed: phase 2's roll-out may not have finished
            ring = roll(ring)
        wait = ring.since + settings.state.request_ttl - clock()
        if wait > 0:
            note(f"phase 3/3: waiting {wait:.0f}s (state.request_ttl) until nothing sealed under "
                 f"{ring.fingerprints()[1]} is valid")
            sleep(wait)
        ring = Ring(ring.secrets[:1])
        note(f"phase 3/3: key {ring.fingerprints()[0]} alone seals and verifies; the old key is retired")
        write_ring(settings, ring, as_root)
        reload()
    return ring
