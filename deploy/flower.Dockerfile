# Stand-ins for Flower's official images, for machines that cannot pull them (deploy/images.py
# builds them when `docker pull flwr/superlink:<version>` fails). Same layout as Flower's own
# images: Python with `flwr` in /python/venv on PATH, the user `app` (UID 49999, home /app),
# working folder /app, and one entrypoint per image:
#
#   docker build -f deploy/flower.Dockerfile --build-arg BASE=<a Debian root filesystem image> \
#       --target superlink -t flwr/superlink:1.42.0 <folder of flwr's wheels>
#
# The build context is a folder of wheels (`pip download flwr==<version>`): nothing is fetched.
ARG BASE=fgl-base/debian-python3:bookworm
FROM ${BASE} AS base
ARG FLWR_VERSION=1.42.0
COPY . /tmp/wheels
RUN python3 -m venv /python/venv \
    && /python/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        "flwr==${FLWR_VERSION}" \
    && rm -rf /tmp/wheels \
    && useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
    && mkdir -p /app \
    && chown -R app:app /app /python/venv
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HOME=/app
WORKDIR /app
USER app

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
