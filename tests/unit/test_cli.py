"""The command's own process settings (the commands themselves run in tests/integration)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from worker import cli


def test_tune_gc_freezes_start_up_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    try:
        cli.tune_gc()
        assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("command", ["stack", "demo"])
def test_development_commands_say_so_where_devstack_is_not_installed(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "devstack" or m.startswith("devstack.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "devstack", None)  # what a missing package looks like to import
    with pytest.raises(SystemExit) as exited:
        cli.main([command])
    assert "devstack" in str(exited.value.code) and "make install" in str(exited.value.code)


def test_a_development_module_missing_a_dependency_is_not_reported_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "devstack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import tritonq_no_such_dependency\n")
    for name in [m for m in sys.modules if m == "devstack" or m.startswith("devstack.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        cli._development("devstack.broken")
    assert raised.value.name == "tritonq_no_such_dependency"
    monkeypatch.delitem(sys.modules, "devstack")


def test_an_invalid_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRITONQ_LOG_LEVEL", "verbose")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "invalid TRITONQ_* settings" in err
    assert "log_level" in err and "Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in err
