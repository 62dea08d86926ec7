"""The command's own process settings (the commands themselves run in tests/integration)."""

from __future__ import annotations

import gc

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


def test_an_invalid_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRITONQ_LOG_LEVEL", "verbose")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "invalid TRITONQ_* settings" in err
    assert "log_level" in err and "Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in err
