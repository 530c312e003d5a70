"""Inside `unshare --mount --net`: make this host look like the container, then exec its entry command.

Run as root by tests/deploy/test_container_contract.py (there is no Docker engine here):

    unshare --mount --net --propagation private --fork -- python container_sandbox.py SPEC.json

What a container engine would do, done by hand in the new namespaces:
- loopback up, no other interface (the container's own network: port 8080 is free);
- the documented writable paths are bind mounts of fresh directories; every other mount
  (the host's root and all below it, but /proc, /sys and /dev) is read-only, as with
  `docker run --read-only`; the config directory is an empty one, as in the image;
- the entry command runs as the unprivileged user with no capabilities, no way to gain
  privileges, in the image's working directory and with only the image's environment,
  and its stdout/stderr belong to that user (as runc arranges).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

#: Kernel filesystems that are not part of the image's root (left as they are).
KERNEL_TREES = ("/proc", "/sys", "/dev")


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, per-mount options, filesystem type) of every mount, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        point = fields[4].encode().decode("unicode_escape")  # "\040" is a space
        found.append((point, fields[5], right.split()[0]))
    return found


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def make_read_only(keep_writable: set[str], covered: set[str]) -> None:
    """Remount every mount read-only (per mount: `bind` never touches the filesystem itself).

    Mounts below `covered` paths are hidden by what was mounted over them, and left alone.
    """
    for point, options, fstype in mounts():
        if point in keep_writable or any(under(point, tree) for tree in KERNEL_TREES if point != "/dev/shm"):
            continue
        if any(under(point, tree) and point != tree for tree in covered):
            continue
        if fstype in {"nsfs", "autofs"}:
            continue  # not files: nothing to write there
        flags = [o for o in options.split(",") if o in {"nosuid", "nodev", "noexec", "noatime", "relatime"}]
        mount("-o", ",".join(["remount", "bind", "ro", *flags]), point)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # /tmp last: the other sources may live under the host's /tmp.
    for target in spec["hidden"]:
        mount("--bind", spec["empty_dir"], target)
    writable = sorted(spec["writable"].items(), key=lambda item: item[0] == "/tmp")
    for target, source in writable:
        mount("--bind", source, target)
    make_read_only({target for target, _ in writable}, {target for target, _ in writable} | set(spec["hidden"]))
    os.chdir(spec["workdir"])
    # runc hands the container's stdio to its user (fixStdioPermissions), so that processes
    # can reopen /dev/stdout (supervisord and nginx do): the same here.
    user_info = pwd.getpwnam(spec["user"])
    for fd in (1, 2):
        os.fchown(fd, user_info.pw_uid, user_info.pw_gid)
    env = [f"{k}={v}" for k, v in spec["env"].items()]
    user = spec["user"]
    os.execvp("setpriv", [
        "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--no-new-privs",
        "--inh-caps=-all", "--bounding-set=-all", "--",
        "env", "-i", *env, *spec["argv"],
    ])


if __name__ == "__main__":
    main(sys.argv[1])
