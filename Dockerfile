# mcp-appliance: nginx + N MCP workers + admin app under supervisord, one process tree.
#
#   docker build -t mcp-appliance:0.1.0 .
#   docker run --read-only --tmpfs /run/mcp-appliance --tmpfs /tmp -p 8080:8080 mcp-appliance:0.1.0
#
# The contract (tests/deploy/test_container_contract.py runs the entry command below the
# way a container engine would, since no Docker engine runs in CI):
# - runs as uid/gid 10001 (user mcp-appliance), never root;
# - the root filesystem may be read-only: only /var/lib/mcp-appliance (data),
#   /var/log/mcp-appliance (logs), /run/mcp-appliance (rendered config, sockets) and /tmp
#   are written;
# - nginx listens on $MCP_PORT (8080); every process logs JSON lines to stdout;
# - tini is PID 1: it passes SIGTERM to supervisord, which stops nginx gracefully, then
#   the admin app and the workers (allow 30 s: `docker stop -t 30`);
# - configuration: /etc/mcp-appliance/appliance.toml (mount one; missing means defaults),
#   then MCP_APPLIANCE_* environment variables, which win.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, installed into a venv that is copied whole into the runtime ----------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance/ appliance/
COPY conf/ conf/
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/mcp-appliance \
 && pip --python /opt/mcp-appliance/bin/python install --no-cache-dir --disable-pip-version-check /wheels/*.whl

# --- runtime: Python (same image as the build, so the venv's interpreter path holds) + nginx --
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mcp-appliance" \
      org.opencontainers.image.description="A production home for Model Context Protocol servers" \
      org.opencontainers.image.licenses="MIT"

# Versions are not pinned: bookworm's security updates replace old ones on the mirror.
# nodejs and npm: npx for stdio servers from npm (uvx, for PyPI, is in the venv); their caches
# go under /var/lib/mcp-appliance (appliance/toolchain.py), trusting ca-certificates' bundle.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light tini nodejs npm ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mcp-appliance \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mcp-appliance --no-create-home \
        --shell /usr/sbin/nologin mcp-appliance \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/mcp-appliance /var/log/mcp-appliance /run/mcp-appliance \
 && install -d -m 0755 /etc/mcp-appliance

COPY --from=build /opt/mcp-appliance /opt/mcp-appliance

# The container's part of the configuration: where it writes, how it listens and logs.
ENV PATH=/opt/mcp-appliance/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    MCP_PORT=8080 \
    MCP_APPLIANCE_LOG_TARGET=stdout \
    MCP_APPLIANCE_DATA_DIR=/var/lib/mcp-appliance \
    MCP_APPLIANCE_LOG_DIR=/var/log/mcp-appliance \
    MCP_APPLIANCE_RUN_DIR=/run/mcp-appliance

# Kept across container restarts; /run/mcp-appliance and /tmp are scratch (tmpfs / emptyDir).
VOLUME ["/var/lib/mcp-appliance", "/var/log/mcp-appliance"]

# mcp-appliance, by number so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/mcp-appliance
EXPOSE 8080
STOPSIGNAL SIGTERM

# Liveness through nginx (the only listener), without adding curl to the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('MCP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["mcp-appliance", "run"]
