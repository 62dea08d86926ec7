"""The pod as the manifests describe it, on this machine: its uids and group, Triton's arguments.

Read from ``kubectl kustomize k8s/overlays/dev`` (test_deploy.py checks that the gke overlay's
Triton differs only by its repository). The tests are test_pod.py; this module starts things.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.components import DEFAULT_MODEL_REPOSITORY, Triton
from devstack.probe import free_port, wait_until
from devstack.stack import Stack, ensure_models
from tests.integration.test_deploy import REPO, container, pod_spec, render
from worker.config import Settings

#: Seconds the worker child gets to become ready (Triton is already up).
WORKER_READY_S = 120.0


@dataclass(frozen=True)
class PodIds:
    worker_uid: int
    triton_uid: int
    gid: int
    fs_group: int

    def setpriv(self, uid: int) -> list[str]:
        """Run as the kubelet would: that uid, the pod's group, fsGroup as the supplementary group."""
        return ["setpriv", f"--reuid={uid}", f"--regid={self.gid}", f"--groups={self.fs_group}", "--"]


def pod_ids() -> PodIds:
    docs = render("dev")
    pod = pod_spec(docs)["securityContext"]
    return PodIds(
        worker_uid=container(docs, "worker")["securityContext"]["runAsUser"],
        triton_uid=container(docs, "triton")["securityContext"]["runAsUser"],
        gid=pod["runAsGroup"],
        fs_group=pod["fsGroup"],
    )


@dataclass
class PodTriton(Triton):
    """Triton with the Triton container's arguments (ports and repository made local) and uid."""

    pod_args: Sequence[str] = ()
    user: Sequence[str] = ()

    def command(self) -> list[str]:
        binary = super().command()[0]
        local = {
            "--http-port": str(self.http_port),
            "--grpc-port": str(self.grpc_port),
            "--metrics-port": str(self.metrics_port),
            "--model-repository": str(self.model_repository),
        }
        assert self.pod_args[0] == "tritonserver", self.pod_args
        args = []
        for arg in self.pod_args[1:]:
            key = arg.split("=", 1)[0]
            args.append(f"{key}={local[key]}" if key in local else arg)
        return [*self.user, binary, *args, f"--backend-directory={self._backends()}"]

    def environment(self) -> dict[str, str]:
        # The Python backend's stubs run the system libpython isolated (PYTHONPATH is ignored) and
        # take their packages from the venv of the python3 on PATH.
        env = super().environment()
        env["PATH"] = os.pathsep.join([str(pod_python(self.log_dir.parent).parent), env["PATH"]])
        return env


def pod_python(root: Path) -> Path:
    """A python3 the pod's uids can run, with this project's packages: a venv on the system
    interpreter. This project's own venv may be based on an interpreter they cannot read (under
    /root), which they could neither exec (the worker, multiprocessing's resource tracker) nor
    take packages from (Triton's stubs)."""
    venv = root / "python"
    if not venv.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        (site,) = venv.glob("lib/python3*/site-packages")
        (site / "tritonq.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{REPO}\n")
    return venv / "bin" / "python3"


#: A model of the pod's repository that fails to load: the pod must stay ready without it.
BROKEN_MODEL = "broken"


def repository_with_a_broken_model(root: Path) -> Path:
    """The local repository plus ``broken``: enhance's config under another name, a model.py that raises."""
    ensure_models(DEFAULT_MODEL_REPOSITORY)
    repository = root / "models"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    broken = repository / BROKEN_MODEL
    shutil.copytree(repository / "enhance", broken)
    config = broken / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "enhance"', f'name: "{BROKEN_MODEL}"', 1))
    for model in broken.glob("*/model.py"):
        model.write_text('raise RuntimeError("this model is broken on purpose")\n')
    return repository


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def worker_as(
    ids: PodIds, stack: Stack, settings: Settings, triton: PodTriton, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``tritonq run`` as the worker container's uid, pointed at the pod's Triton; yields it and its port."""
    port = free_port()
    env = {
        **os.environ,
        **stack.environment(settings),
        "TRITONQ_TRITON_URL": triton.grpc_url,
        "TRITONQ_HTTP_PORT": str(port),
        "TRITONQ_SHARED_MEMORY": "auto",
        "TRITONQ_LOG_FORMAT": "json",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*ids.setpriv(ids.worker_uid), str(pod_python(triton.log_dir.parent)), "-m", "worker.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200,
            "worker",
            WORKER_READY_S,
            lambda: proc.poll() is None,
        )
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def network_namespace() -> Iterator[tuple[str, str]]:
    """A namespace of this test's own, joined to ours by a veth pair: yields (namespace, our end's address)."""
    tag = secrets.token_hex(3)
    ns, here, there = f"tritonq-{tag}", f"tqh{tag}", f"tqn{tag}"
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    while True:  # a /30 in 10/8 that no interface here is on
        a, b, c = 10, secrets.randbelow(256), secrets.randbelow(64) * 4
        if f" {a}.{b}.{c}." not in used:
            break
    ours, theirs = f"{a}.{b}.{c}.1", f"{a}.{b}.{c}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("addr", "add", f"{ours}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{theirs}/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        yield ns, ours
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", here)
        _ip("netns", "del", ns)
