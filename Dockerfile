# syntax=docker/dockerfile:1
#
# The worker image: `tritonq run`, configured only from TRITONQ_* environment variables.
#
#   docker build -t tritonq-worker .
#
# Two stages: the first resolves nothing (requirements.lock pins every package with hashes) and
# installs wheels only, so neither stage needs a compiler; the second carries just the Python
# runtime and the virtual environment, without pip, the source tree or any cache.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The venv has no pip of its own: the base image's pip installs into it (`--python`), so the
# final image gets no installer.
RUN python -m venv --without-pip /opt/venv

# Dependencies first, in their own layer, so a code change does not reinstall them.
# --only-binary: a package without a wheel for this platform fails the build here rather than
# silently needing a compiler; --no-deps: the lock is complete, nothing may be resolved now.
COPY requirements.lock /tmp/requirements.lock
RUN pip --python /opt/venv/bin/python install --require-hashes --only-binary=:all: --no-deps \
        -r /tmp/requirements.lock

# The project itself, without dependencies (all locked above). Only what the package needs is
# copied; .dockerignore keeps the rest of the tree out of the build context.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip --python /opt/venv/bin/python install --no-deps . \
    && /opt/venv/bin/tritonq --help > /dev/null


FROM ${PYTHON_IMAGE}

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup and
# the pod's securityContext can name the same ids.
RUN groupadd --system --gid 10001 tritonq \
    && useradd --system --uid 10001 --gid tritonq --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tritonq

COPY --from=build /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; the venv's .pyc files
# were already written at install time. JSON logs: the image runs where a collector reads stdout.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TRITONQ_LOG_FORMAT=json \
    TRITONQ_HTTP_PORT=8080

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# /healthz answers while the process is alive (readiness, which also needs Triton, is /readyz and
# is the orchestrator's business). Python, not curl: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TRITONQ_HTTP_PORT', '8080'), timeout=4)"]

# The worker handles SIGTERM itself (stop pulling, drain, nack the rest), so it runs as PID 1
# directly, with no shell in between that would swallow the signal.
ENTRYPOINT ["tritonq"]
CMD ["run"]
