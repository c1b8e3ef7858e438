# syntax=docker/dockerfile:1
#
# tokenrelay container image.
#
#   docker build -t tokenrelay:0.1.0 .
#
# Try it with the demo vendor inside the container (no config to mount, no vendor account;
# deploy/docker/demo.yaml, baked in at /usr/share/tokenrelay/demo.yaml):
#
#   export TOKENRELAY_DEMO_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
#   docker run --rm -p 127.0.0.1:8080:8080 -e TOKENRELAY_DEMO_KEY \
#     --entrypoint python tokenrelay:0.1.0 -m proxy.demo_run --config /usr/share/tokenrelay/demo.yaml
#   curl -s -H "X-Api-Key: $TOKENRELAY_DEMO_KEY" localhost:8080/demo/api/hello
#
# With your own config:
#
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -v "$PWD/routes.yaml:/etc/tokenrelay/routes.yaml:ro" \
#     -v "$PWD/secrets:/run/secrets/tokenrelay:ro" \
#     tokenrelay:0.1.0
#
# The config is read from /etc/tokenrelay/routes.yaml (mount it; none is baked in). The
# repository's routes.yaml is for `make run` on a workstation and does not start here: its
# demo vendor runs only under `python -m proxy.demo_run`, and it has no `clients:`.
# Keep credentials out of the config: mount them as files and point *_file keys at them
# (password_file: /run/secrets/tokenrelay/simacan-password), or pass ${VAR}s with -e.
# The proxy listens on 0.0.0.0 inside the container, so routes.yaml must configure
# `clients:` or say `allow_unauthenticated: true`; tokenrelay refuses to start otherwise.
# Extra arguments replace CMD, e.g. `... tokenrelay:0.1.0 check --config /etc/tokenrelay/routes.yaml`.
# The root filesystem can be read-only (docker run --read-only --tmpfs /tmp): the proxy
# only writes request bodies kept for a replay, under spool_dir (default: /tmp).
#
# Reproducible: the Python packages come from requirements.lock (and the build backend
# from requirements-build.lock), every file checked against its SHA-256 (pip
# --require-hashes). Regenerate both after changing dependencies in pyproject.toml, in a
# throwaway venv with pip-tools, from PyPI:
#   pip-compile --generate-hashes --strip-extras --no-emit-index-url \
#     --output-file requirements.lock pyproject.toml
#   pip-compile --generate-hashes --strip-extras --no-emit-index-url --allow-unsafe \
#     --all-build-deps --only-build-deps --output-file requirements-build.lock pyproject.toml

# The base image, pinned by digest in this one place. Fill PYTHON_DIGEST with the digest
# of the multi-platform index (it covers amd64 and arm64), from either of:
#   docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
#   crane digest python:3.11-slim
# e.g. ARG PYTHON_DIGEST=sha256:<64 hex digits>, or per build:
#   docker build --build-arg PYTHON_DIGEST=$(crane digest python:3.11-slim) ...
# Empty, the build uses whatever python:3.11-slim is at the time (not reproducible).
ARG PYTHON_DIGEST=
ARG PYTHON_IMAGE=python:3.11-slim${PYTHON_DIGEST:+@${PYTHON_DIGEST}}

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The locked dependencies first: this layer is rebuilt only when a lock file changes.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes -r requirements-build.lock \
 && python -m venv /opt/tokenrelay \
 && /opt/tokenrelay/bin/pip install --require-hashes -r requirements.lock
# Only what the package needs: tests, docs and local state stay out (.dockerignore too).
# The package itself is built from this context with the locked backend (no download)
# and installed without dependencies: they are all in the lock.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/tokenrelay/bin/pip install --no-deps /wheels/tokenrelay-*.whl \
 && /opt/tokenrelay/bin/pip check \
 && /opt/tokenrelay/bin/tokenrelay --version

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="tokenrelay" \
      org.opencontainers.image.description="Authenticating reverse proxy: injects vendor Bearer tokens, refreshes them, replays once on 401" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 tokenrelay \
 && useradd --system --uid 10001 --gid tokenrelay --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin tokenrelay

COPY --from=build /opt/tokenrelay /opt/tokenrelay
# The demo config for `python -m proxy.demo_run` (see the top of this file).
COPY deploy/docker/demo.yaml /usr/share/tokenrelay/demo.yaml

# Byte code was compiled at install time; never write it at run time (read-only root).
ENV PATH=/opt/tokenrelay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENRELAY_CONFIG=/etc/tokenrelay/routes.yaml \
    TOKENRELAY_HEALTH_URL=http://127.0.0.1:8080/-/health

USER 10001:10001
WORKDIR /etc/tokenrelay
EXPOSE 8080

# slim has no curl: ask with the interpreter the image already has. Set
# TOKENRELAY_HEALTH_URL when the proxy listens elsewhere (another port, an admin listener).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ['TOKENRELAY_HEALTH_URL'], timeout=4)"]

# Exec form: tokenrelay is PID 1 and receives SIGTERM itself (docker stop, Kubernetes),
# so it stops accepting, drains for shutdown_grace seconds and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenrelay"]
CMD ["--config", "/etc/tokenrelay/routes.yaml", "--host", "0.0.0.0"]
