"""Tiny stdio-server packages made on the spot, for npx and uvx to install with no registry.

An npm tarball (what `npm pack` makes) and a wheel (written by hand: no build backend is
reachable offline), each with one executable that prints MARKER.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

MARKER = "hello from a stdio server package"
#: The executable both packages install.
EXECUTABLE = "hello-stdio-server"


def npm_tarball(directory: Path) -> Path:
    """hello-stdio-server-1.0.0.tgz in `directory`, readable by everyone."""
    package = directory / "npm-package"
    package.mkdir()
    (package / "package.json").write_text(json.dumps(
        {"name": EXECUTABLE, "version": "1.0.0", "bin": {EXECUTABLE: "cli.js"}}))
    (package / "cli.js").write_text(f"#!/usr/bin/env node\nconsole.log({json.dumps(MARKER)});\n")
    packed = subprocess.run(["npm", "pack", "--silent", "--offline", "--pack-destination", str(directory), str(package)],
                            capture_output=True, text=True, timeout=120, cwd=directory,
                            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(directory),
                                 "npm_config_cache": str(directory / "pack-cache")})
    assert packed.returncode == 0, packed.stderr
    tarball = directory / packed.stdout.strip().splitlines()[-1]
    tarball.chmod(0o644)
    return tarball


def wheel(directory: Path) -> Path:
    """hello_stdio_server-1.0-py3-none-any.whl in `directory`, readable by everyone."""
    dist = "hello_stdio_server-1.0.dist-info"
    files = {
        "hello_stdio_server.py": f"def main():\n    print({MARKER!r})\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {EXECUTABLE}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": f"[console_scripts]\n{EXECUTABLE} = hello_stdio_server:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    path = directory / "hello_stdio_server-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    path.chmod(0o644)
    return path


def npx_argv(tarball: str) -> list[str]:
    """npx installing the tarball into its cache and running it, without the registry."""
    return ["npx", "-y", "--offline", f"--package={tarball}", EXECUTABLE]


def uvx_argv(wheel_path: str) -> list[str]:
    """uvx installing the wheel into its cache and running it, without the index."""
    return ["uvx", "--offline", "--from", wheel_path, EXECUTABLE]
