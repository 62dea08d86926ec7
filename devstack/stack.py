"""The local stack: the three components started together, provisioned from one ``Settings``, and its environment.

One code path starts the stack for ``tritonq stack``, ``make demo``, the
integration tests, the benchmark and the fault scenarios, so what the tests
exercise is what a developer runs. Provisioning is the product's own
(``worker.provision``, what ``tritonq init`` runs), pointed at the emulators.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devstack.components import DEFAULT_MODEL_REPOSITORY, GcsEmulator, PubSubEmulator, Triton
from worker.config import Settings
from worker.provision import create_bucket, provision_pubsub


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
            "TRITONQ_INPUT_BUCKET": settings.input_bucket,
            "TRITONQ_OUTPUT_BUCKET": settings.output_bucket,
            "TRITONQ_TRITON_URL": self.triton.grpc_url,
            **({"TRITONQ_RESULTS_TOPIC": settings.results_topic} if settings.results_topic else {}),
        }

    def write_env_file(self, settings: Settings, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"export {key}={value}" for key, value in self.environment(settings).items()]
        path.write_text("\n".join(lines) + "\n")

    def environ(self, settings: Settings) -> contextlib.AbstractContextManager[None]:
        """Point this process's clients at the stack for the duration of a ``with`` block."""
        return temporary_env(self.environment(settings))

    def provision_pubsub(self, settings: Settings, *, dead_letter: bool = True) -> None:
        """``worker.provision.provision_pubsub`` on this stack's emulator."""
        with temporary_env({"PUBSUB_EMULATOR_HOST": self.pubsub.host}):
            provision_pubsub(settings, dead_letter=dead_letter)

    def create_bucket(self, settings: Settings, bucket: str, *, versioned: bool = False) -> None:
        create_bucket(self.gcs.url, settings.project, bucket, versioned=versioned)

    def provision(self, settings: Settings) -> None:
        """Create the topics, the subscription (with its dead-letter policy) and the buckets."""
        self.provision_pubsub(settings)
        for bucket in {settings.input_bucket, settings.output_bucket}:
            self.create_bucket(settings, bucket)


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


def serve(settings: Settings, state_dir: Path) -> int:
    """``tritonq stack``: start the stack, write its environment file, and run until SIGINT or SIGTERM."""
    stack = Stack(state_dir=state_dir.resolve())
    if not settings.results_topic:
        settings = settings.model_copy(update={"results_topic": "tritonq-job-results"})

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start(progress=lambda text: print(f"stack: {text}", flush=True))
        stack.provision(settings)
        env_file = state_dir / "stack.env"
        stack.write_env_file(settings, env_file)
        print(
            f"stack: ready; `source {env_file} && tritonq run` serves it. Ctrl-C stops everything.",
            flush=True,
        )
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("stack: stopping", flush=True)
        stack.stop()
    return 0
