"""The development package's pure parts: readiness polling, the stack's environment, /proc parsing.

Starting the components and the worker process is what every integration test
does (tests/conftest.py); these check the logic around it without any process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from devstack.probe import StackError, free_port, http_ok, wait_until
from devstack.stack import Stack, temporary_env
from devstack.worker_process import parse_peak_rss_bytes
from worker.config import Settings


def test_wait_until_returns_once_the_check_holds_and_fails_when_the_process_exits() -> None:
    answers = iter([False, False, True])
    wait_until(lambda: next(answers), "thing", timeout_s=10, alive=lambda: True)
    with pytest.raises(StackError, match="thing exited before it was ready"):
        wait_until(lambda: False, "thing", timeout_s=10, alive=lambda: False)


def test_wait_until_treats_a_refused_connection_as_not_ready_and_stops_at_the_deadline() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError

    with pytest.raises(StackError, match="thing not ready after 0 s"):
        wait_until(refused, "thing", timeout_s=0.2, alive=lambda: True)


def test_http_ok_is_a_no_where_nothing_listens() -> None:
    with socket.socket() as held:  # bound, not listening: a connection is refused
        held.bind(("127.0.0.1", 0))
        assert http_ok(f"http://127.0.0.1:{held.getsockname()[1]}/") is False


def test_free_ports_are_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_the_stack_environment_points_clients_and_the_worker_at_its_components(tmp_path: Path) -> None:
    stack = Stack(state_dir=tmp_path)
    settings = Settings(topic="t", subscription="s", results_topic="r")
    env = stack.environment(settings)
    assert env["PUBSUB_EMULATOR_HOST"] == f"127.0.0.1:{stack.pubsub.port}"
    assert env["STORAGE_EMULATOR_HOST"] == f"http://127.0.0.1:{stack.gcs.port}"
    assert env["TRITONQ_TRITON_URL"] == f"127.0.0.1:{stack.triton.grpc_port}"
    assert (env["TRITONQ_TOPIC"], env["TRITONQ_SUBSCRIPTION"], env["TRITONQ_RESULTS_TOPIC"]) == ("t", "s", "r")
    assert "TRITONQ_RESULTS_TOPIC" not in stack.environment(Settings(results_topic=""))
    stack.write_env_file(settings, tmp_path / "stack.env")
    lines = (tmp_path / "stack.env").read_text().splitlines()
    assert lines == [f"export {key}={value}" for key, value in env.items()]


def test_temporary_env_restores_what_was_there_and_removes_what_was_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITONQ_DEVSTACK_KEPT", "before")
    monkeypatch.delenv("TRITONQ_DEVSTACK_NEW", raising=False)
    with temporary_env({"TRITONQ_DEVSTACK_KEPT": "during", "TRITONQ_DEVSTACK_NEW": "during"}):
        assert os.environ["TRITONQ_DEVSTACK_KEPT"] == os.environ["TRITONQ_DEVSTACK_NEW"] == "during"
    assert os.environ["TRITONQ_DEVSTACK_KEPT"] == "before"
    assert "TRITONQ_DEVSTACK_NEW" not in os.environ


def test_peak_rss_is_read_from_vmhwm_in_kilobytes() -> None:
    status = "Name:\tpython\nVmPeak:\t  400000 kB\nVmHWM:\t  170000 kB\nVmRSS:\t  160000 kB\n"
    assert parse_peak_rss_bytes(status) == 170000 * 1024
    with pytest.raises(ValueError):
        parse_peak_rss_bytes("Name:\tpython\n")
    with pytest.raises(ValueError, match="unit"):
        parse_peak_rss_bytes("VmHWM:\t  170000 MB\n")
