"""The producer's client: where it looks for a job's record."""

from __future__ import annotations

from worker.client import JobClient, _outermost, build_job
from worker.config import Settings
from worker.jobs import GcsRef


def test_a_job_refused_as_invalid_is_found_under_invalid_by_its_message_id() -> None:
    client = JobClient(Settings(output_bucket="out", output_prefix="results"))
    job = build_job("enhance", input_uri="gs://in/a.jpg", job_id="j1", output_prefix="gs://other/p")
    assert client.records_of(job) == [GcsRef("other", "p/j1.json")]
    client._message_ids["j1"] = ["41", "42"]  # what publish() keeps
    assert client.records_of(job) == [
        GcsRef("other", "p/j1.json"),
        GcsRef("out", "results/_invalid/41.json"),
        GcsRef("out", "results/_invalid/42.json"),
    ]


def test_one_recursive_listing_covers_the_prefixes_under_it() -> None:
    prefixes = {("out", "results"), ("out", "results/_invalid"), ("other", "results/_invalid"), ("out", "res")}
    assert _outermost(prefixes) == {("out", "results"), ("other", "results/_invalid"), ("out", "res")}
    assert _outermost({("out", ""), ("out", "a/b")}) == {("out", "")}
