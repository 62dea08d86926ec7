"""The jobs topic's schema, the README's example message and its schema commands agree with the proto."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format

from worker import jobs, schema
from worker.jobs import GcsRef, ImageJob, JobRules

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_schema_is_imagejob_alone_and_compiles(tmp_path: Path) -> None:
    text = schema.definition()
    assert re.findall(r"^message (\w+)", text, re.M) == ["ImageJob"]
    assert "import " not in text  # Pub/Sub schemas are one self-contained file
    (tmp_path / "job_schema.proto").write_text(text)
    compiled = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", "job_schema.proto"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stderr


def test_the_packaged_contract_is_the_proto() -> None:
    packaged = ROOT / "worker" / "proto" / "job.proto"
    assert packaged.read_text() == (ROOT / "protos" / "job.proto").read_text(), "run make proto"


def test_the_readme_example_is_a_valid_job() -> None:
    example = re.search(r"```json\n(\{.*?\})\n```", README, re.S)
    assert example is not None
    message = json_format.Parse(example.group(1), ImageJob())  # strict: unknown fields fail
    rules = JobRules(
        frozenset({"tritonq-inputs"}), frozenset({"tritonq-results"}), GcsRef("tritonq-results", "r"), 1024
    )
    job = jobs.validate(message, rules)
    assert job.model == "upscale"


def test_the_readme_shows_the_schema_commands() -> None:
    for line in schema.gcloud_commands("$PROJECT", "tritonq-jobs"):
        assert line in README
