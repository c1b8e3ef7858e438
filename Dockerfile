# syntax=docker/dockerfile:1
#
# tokenrelay container image.
#
#   docker build -t tokenrelay:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/routes.yaml:/etc/tokenrelay/routes.yaml:ro" \
#     -v "$PWD/secrets:/run/secrets/tokenrelay:ro" \
#     tokenrelay:0.1.0
#
# The config is read from /etc/tokenrelay/routes.yaml (mount it; none is baked in).
# Keep credentials out of it: mount them as files and point *_file keys at them
# (password_file: /run/secrets/tokenrelay/simacan-password), or pass ${VAR}s with -e.
# The proxy listens on 0.0.0.0 inside the container, so routes.yaml must configure
# `clients:` or say `allow_unauthenticated: true`; tokenrelay refuses to start otherwise.
# Extra arguments replace CMD, e.g. `... tokenrelay:0.1.0 check --config /etc/tokenrelay/routes.yaml`.
# The root filesystem can be read-only (docker run --read-only --tmpfs /tmp): the proxy
# only writes request bodies kept for a replay, under spool_dir (default: /tmp).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tokenrelay
WORKDIR /src
# Only what the package needs: tests, docs and local state stay out (.dockerignore too).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/tokenrelay/bin/pip install . \
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
