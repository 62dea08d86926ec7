"""What the worker image installs: the Dockerfile copies ``worker/`` alone, and that must be a whole product.

The image's install step is replayed without Docker: ``pip install --no-deps``
from a folder holding only what the Dockerfile copies, into a target folder.
The result must hold the product package and not the development one, and the
installed ``tritonq`` must run its production commands and refuse the
development ones with a message, run with the import path of an image (the
installed package and its dependencies, nothing of this checkout).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("context")
    copied = re.findall(r"^COPY\s+(?!--from)(.+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    project = [src for line in copied for src in line.split()[:-1] if src != "requirements.lock"]
    assert set(project) == {"pyproject.toml", "README.md", "worker"}, project
    for src in project:
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, source / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / src, source / src)
    target = tmp_path_factory.mktemp("site")
    # --no-build-isolation: setuptools from this environment, nothing downloaded.
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    return target


def tritonq(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, seeing only the installed package and the dependencies (no ``.pth`` files: ``-S``)."""
    path = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    code = f"import sys; sys.path[:0] = {path!r}; from worker.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=target, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_image_installs_the_product_package_only(installed: Path) -> None:
    packages = {p.name for p in installed.iterdir() if (p / "__init__.py").exists()}
    assert packages == {"worker"}
    assert (installed / "worker" / "provision.py").exists()
    assert (installed / "worker" / "proto" / "job.proto").exists()


def test_the_installed_command_runs_and_knows_it_has_no_development_package(installed: Path) -> None:
    shown = tritonq(installed, "settings", "--markdown")
    assert shown.returncode == 0, shown.stderr
    assert "TRITONQ_TOPIC" in shown.stdout
    for command in ("stack", "demo"):
        refused = tritonq(installed, command)
        assert refused.returncode == 1
        assert "devstack" in refused.stderr and "make install" in refused.stderr, refused.stderr
