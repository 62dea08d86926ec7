"""The pod as the manifests describe it, run on this machine: its uids, its group, Triton's arguments.

Everything is read from ``kubectl kustomize k8s/overlays/dev`` (the gke overlay's Triton
arguments differ only by the repository, ``test_deploy.py`` checks that), so a change to the
manifests is what these tests exercise:

- Shared memory across two uids: Triton runs as the Triton container's uid, the worker as the
  worker container's, both in the pod's group, as the kubelet would start them (``setpriv``).
  The worker's regions are mapped by Triton, and its metric says the requests went that way.
- Lockdown: Triton started with the pod's arguments answers its probes on loopback, while a
  client in a network namespace this test creates (joined by a veth pair) is refused on the
  HTTP and gRPC ports, so the shared-memory, repository, logging and trace APIs are closed to
  any other pod; the metrics port, which must stay open to the scrapers, answers it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.probe import wait_until
from devstack.samples import sample_image
from devstack.stack import Stack
from tests.integration.pod import (
    BROKEN_MODEL,
    PodIds,
    PodTriton,
    http_get,
    network_namespace,
    pod_ids,
    pod_python,
    repository_with_a_broken_model,
    worker_as,
)
from tests.integration.test_deploy import container, render
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import JobResult

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ids() -> PodIds:
    if os.geteuid() != 0:
        pytest.fail("these tests start processes under the pod's uids: run them as root", pytrace=False)
    return pod_ids()


@pytest.fixture(scope="module")
def pod_root() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is private to root, and the pod's uids must read it.
    root = Path(tempfile.mkdtemp(prefix="tritonq-pod-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pod_triton(ids: PodIds, pod_root: Path) -> Iterator[PodTriton]:
    root = pod_root
    triton = PodTriton(
        "triton-pod",
        root / "logs",
        model_repository=repository_with_a_broken_model(root),
        pod_args=container(render("dev"), "triton")["args"],
        user=ids.setpriv(ids.triton_uid),
    )
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


# --- shared memory across two uids ---------------------------------------------------------------


def _metric(text: str, name: str, labels: str) -> float:
    found = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _nacked_for(log: Path, job_id: str) -> dict[str, Any] | None:
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("message") == "job_nacked" and event.get("job_id") == job_id:
                return dict(event)
    return None


def _regions() -> set[Path]:
    """The worker's regions under /dev/shm (named by worker/shm.py: ``tritonq-`` and 32 hex digits)."""
    return {p for p in Path("/dev/shm").glob("tritonq-*") if re.fullmatch(r"tritonq-[0-9a-f]{32}", p.name)}


async def test_worker_and_triton_under_the_pods_two_uids_share_memory(
    ids: PodIds, pod_triton: PodTriton, stack: Stack, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    assert ids.worker_uid != ids.triton_uid, "the test means two uids"
    settings = make_settings(triton_url=pod_triton.grpc_url)
    log = tmp_path / "worker.log"
    async with JobClient(settings) as client:
        uri = await client.upload_bytes(sample_image(256, 192, seed=11), "two-uids.jpg")
        jobs = [build_job("enhance", input_uri=uri, job_id=f"two-uids-{i}", version="1") for i in range(4)]
        broken = build_job(BROKEN_MODEL, input_uri=uri, job_id="two-uids-broken")
        before = _regions()
        # The worker is ready (worker_as waits for /readyz) though a model of the repository failed.
        with worker_as(ids, stack, settings, pod_triton, log) as (_, port):
            await asyncio.gather(*(client.publish(job) for job in [*jobs, broken]))
            results = await client.wait_many(jobs, timeout_s=180)
            regions = [path.stat() for path in _regions() - before]
            wait_until(lambda: _nacked_for(log, broken.job_id) is not None, "broken job nacked", 120, lambda: True)
            metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
            ready = http_get(f"http://127.0.0.1:{port}/readyz")[0]
    assert [r.status for r in results] == [JobResult.SUCCEEDED] * len(jobs), log.read_text()[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("message") == "shared_memory_enabled" for line in lines), log.read_text()[-3000:]
    shared = _metric(metrics, "tritonq_triton_requests_total", 'transport="shared_memory"')
    message = _metric(metrics, "tritonq_triton_requests_total", 'transport="message"')
    assert shared >= len(jobs) and message == 0, (shared, message)
    # The broken model: reported, its job nacked with Triton's reason, the worker still ready.
    assert ready == 200
    assert _metric(metrics, "tritonq_model_ready", f'model="{BROKEN_MODEL}"') == 0
    assert _metric(metrics, "tritonq_model_ready", 'model="enhance"') == 1
    unavailable = [line for line in lines if line.get("message") == "model_unavailable"]
    assert [line["model"] for line in unavailable] == [BROKEN_MODEL]
    assert "broken on purpose" in unavailable[0]["reason"]
    nacked = _nacked_for(log, broken.job_id)
    assert nacked is not None and "UNAVAILABLE" in nacked["error"] and "broken on purpose" in nacked["error"]
    # The worker's regions: its uid, the pod's group, group read-write, nothing for others.
    assert regions
    for region in regions:
        assert region.st_uid == ids.worker_uid and region.st_gid == ids.gid
        assert stat.S_IMODE(region.st_mode) == 0o660


# Run as the worker's uid: a region as multiprocessing makes it (0600), then one opened to the group.
_REGISTER = """
import json, os, sys
import tritonclient.grpc as grpc
import tritonclient.utils.shared_memory as shm
client = grpc.InferenceServerClient(sys.argv[1])
out = {}
for mode in (0o600, 0o660):
    name = f"tritonq-control-{os.getpid()}-{mode:o}"
    handle = shm.create_shared_memory_region(name, "/" + name, 4096, create_only=True)
    os.fchmod(handle._mpsm_handle._fd, mode)
    try:
        client.register_system_shared_memory(name, "/" + name, 4096)
        client.unregister_system_shared_memory(name)
        out[f"{mode:o}"] = "registered"
    except Exception as exc:
        out[f"{mode:o}"] = str(exc)
    shm.destroy_shared_memory_region(handle)
print(json.dumps(out))
"""


def test_triton_cannot_map_a_region_private_to_the_worker_uid(ids: PodIds, pod_triton: PodTriton) -> None:
    # The control for the test above: across the two uids, the group bit is what makes it work.
    python = str(pod_python(pod_triton.log_dir.parent))
    done = subprocess.run(
        [*ids.setpriv(ids.worker_uid), python, "-c", _REGISTER, pod_triton.grpc_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["660"] == "registered"
    assert outcome["600"] != "registered" and "Unable to open shared memory region" in outcome["600"], outcome


# --- lockdown ------------------------------------------------------------------------------------

#: One request per API that must stay closed to other pods: (method, path, body).
CLOSED_APIS = {
    "shared-memory": ("GET", "/v2/systemsharedmemory/status", None),
    "model-repository": ("POST", "/v2/repository/index", b"{}"),
    "logging": ("GET", "/v2/logging", None),
    "trace": ("GET", "/v2/trace/setting", None),
    "inference": ("GET", "/v2/models/enhance", None),
}

# Run inside the namespace: each request, and a plain TCP connect to the gRPC and metrics ports.
_PROBE = """
import json, socket, sys, urllib.request
host, apis = sys.argv[1], json.loads(sys.argv[5])
http, grpc, metrics = (int(port) for port in sys.argv[2:5])
out = {}
for name, (method, path, body) in apis.items():
    request = urllib.request.Request(f"http://{host}:{http}{path}", data=body and body.encode(), method=method)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            out[name] = response.status
    except OSError as exc:
        out[name] = type(getattr(exc, "reason", exc)).__name__
for name, port in (("grpc", grpc), ("metrics", metrics)):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[name] = "connected"
    except OSError as exc:
        out[name] = type(exc).__name__
with urllib.request.urlopen(f"http://{host}:{metrics}/metrics", timeout=3) as response:
    out["metrics_body"] = "nv_" in response.read().decode()
print(json.dumps(out))
"""


def _probe_commands() -> dict[str, list[str]]:
    triton = container(render("dev"), "triton")
    return {kind: triton[kind]["exec"]["command"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_triton_with_the_pods_arguments_refuses_other_hosts_and_answers_its_probes(pod_triton: PodTriton) -> None:
    # The probes, as the manifest writes them (their port made this Triton's), answer on loopback.
    for kind, command in _probe_commands().items():
        local = [part.replace("127.0.0.1:8000", f"127.0.0.1:{pod_triton.http_port}") for part in command]
        assert subprocess.run(local, timeout=30, check=False).returncode == 0, kind
    # The closed APIs work for the worker beside Triton: a refusal below is the address, not the API.
    for name, (method, path, body) in CLOSED_APIS.items():
        request = urllib.request.Request(f"{pod_triton.http_url}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200, name

    with network_namespace() as (ns, address):
        started = time.monotonic()
        ports = [str(port) for port in (pod_triton.http_port, pod_triton.grpc_port, pod_triton.metrics_port)]
        apis = json.dumps({k: [m, p, b and b.decode()] for k, (m, p, b) in CLOSED_APIS.items()})
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, address, *ports, apis],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)
    # Refused at once (a reset), not filtered into a timeout.
    assert time.monotonic() - started < 30
    for name in (*CLOSED_APIS, "grpc"):
        assert seen[name] == "ConnectionRefusedError", (name, seen)
    # The control: the namespace does reach Triton, on the one port meant for other pods.
    assert seen["metrics"] == "connected" and seen["metrics_body"] is True, seen
