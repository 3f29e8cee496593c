# syntax=docker/dockerfile:1
# lmswitch in a container: `docker build -t lmswitch .`, then see "Run it in Docker" in README.md.
#
# Base images are pinned by version tag. Pin them by digest too where you build
# (`docker buildx imagetools inspect python:3.12-slim-bookworm` prints it, then write
# `python:3.12-slim-bookworm@sha256:...`); the digest cannot be looked up where this file is
# written and tested, so it is not filled in here. The uv version matches the one that wrote
# uv.lock.

# --- build: resolve the locked dependencies into /app/.venv ----------------------------------
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.12-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project
# Then lmswitch itself, installed as a wheel so the image needs no source tree.
COPY README.md ./
COPY proxy ./proxy
RUN uv sync --locked --no-dev --no-editable

# --- runtime: the virtualenv on the same Python, run by an unprivileged user ------------------
FROM python:3.12-slim-bookworm
RUN groupadd --system --gid 10001 lmswitch \
    && useradd --system --uid 10001 --gid lmswitch --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin lmswitch
COPY --from=build /app/.venv /app/.venv
# Every key at its default; mount your own file over it, or set LMSWITCH_* variables.
COPY config.yaml /etc/lmswitch/config.yaml
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LMSWITCH_CONFIG=/etc/lmswitch/config.yaml
# Numeric, so that runtimes (e.g. Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: Python's urllib asks /healthz (no auth, answered from loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Exec form: lmswitch is PID 1 and gets SIGTERM from `docker stop`, then drains for up to
# server.drain_timeout (30 s; give `docker stop` a longer --time, or `docker run --stop-timeout`).
# The port is fixed to 8000 inside the container; publish it where you like with -p.
ENTRYPOINT ["lmswitch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
