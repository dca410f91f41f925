# energy-bridge: slim Python base, non-root user, spool on a volume, health check on /readyz.
#
#   docker build -t energy-bridge .
#   docker run --rm energy-bridge check          # any subcommand: run (default), check,
#                                                # cloud-stub, simulate, demo
# docker-compose.yml runs the bridge, the cloud stand-in and the simulator from this image;
# tests/integration/test_deploy.py checks this file against the CLI and the settings.
# Pinned to one Python patch release on one Debian release, so a rebuild gets the same base;
# bump it on purpose (tests/integration/test_deploy.py insists on an exact tag).
FROM python:3.11.17-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# A numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN pip install . \
    && groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/energy-bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/energy-bridge \
    && chown 10001:10001 /var/lib/energy-bridge

# The directory is owned by the user before VOLUME: a new named volume starts with that owner.
VOLUME ["/var/lib/energy-bridge"]
# In a container the metrics endpoint must listen beyond loopback to be scraped.
ENV ENERGY_BRIDGE_SPOOL__PATH=/var/lib/energy-bridge/spool.db \
    ENERGY_BRIDGE_HTTP__LISTEN=0.0.0.0:9108
EXPOSE 9108
USER 10001:10001

# Ready = connected to the broker, spool writable and not full, cloud accepting our
# credentials. The port follows ENERGY_BRIDGE_HTTP__LISTEN; an HTTP 503 raises, so exit 1.
# Containers of this image that run another subcommand (cloud-stub, simulate) override or
# disable this check (see docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('ENERGY_BRIDGE_HTTP__LISTEN', '127.0.0.1:9108').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4)"]

# The bridge drains on SIGTERM (stop reading, commit, finish in-flight pushes within
# shutdown_grace_secs): give it that long, e.g. docker stop -t 30 / stop_grace_period.
ENTRYPOINT ["energy-bridge"]
CMD ["run"]
