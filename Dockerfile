# energy-bridge: slim Python base, non-root user, spool on a volume, health check on /readyz.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/energy-bridge bridge \
    && mkdir -p /var/lib/energy-bridge && chown bridge /var/lib/energy-bridge

USER bridge
VOLUME ["/var/lib/energy-bridge"]
# In a container the metrics endpoint must listen beyond loopback to be scraped.
ENV ENERGY_BRIDGE_SPOOL__PATH=/var/lib/energy-bridge/spool.db \
    ENERGY_BRIDGE_HTTP__LISTEN=0.0.0.0:9108
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9108/readyz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["energy-bridge"]
CMD ["run"]
