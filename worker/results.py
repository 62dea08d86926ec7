"""The results topic: one ``JobResult`` message per finished job, for producers that listen instead of polling.

Enabled by ``TRITONQ_RESULTS_TOPIC``. The worker publishes after the result is
durable and before it acks, so a failed publish is a ``TransientError`` (the job
is nacked and retried, and finds its result already written). The body is
the ``JobResult`` in protobuf JSON; attributes carry ``job_id``, ``status``,
``model`` and ``version`` so subscribers can filter without parsing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.protobuf import json_format

from worker.errors import TransientError
from worker.jobs import JobResult

#: Seconds a publish may take before the job is nacked instead.
PUBLISH_TIMEOUT_S = 30.0


class ResultsPublisher:
    """Publishes ``JobResult`` messages with the Pub/Sub publisher's own batching."""

    def __init__(self, topic_path: str) -> None:
        self.topic_path = topic_path
        self._publisher: Any = None

    def start(self) -> None:
        if self._publisher is not None:
            raise RuntimeError("ResultsPublisher already started")
        from google.cloud import pubsub_v1

        # A short batch window: results are small, and the ack waits on this publish.
        self._publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.005, max_messages=500)
        )

    async def stop(self) -> None:
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await asyncio.get_running_loop().run_in_executor(None, publisher.stop)

    async def publish(self, result: JobResult) -> str:
        if self._publisher is None:
            raise RuntimeError("ResultsPublisher not started")
        body = json_format.MessageToJson(result, preserving_proto_field_name=True, indent=None).encode()
        attributes = {
            "job_id": result.job_id,
            "status": JobResult.Status.Name(result.status),
            "model": result.model,
            "version": result.model_version,
        }
        try:
            future = self._publisher.publish(self.topic_path, body, **attributes)
            message_id: str = await asyncio.wait_for(asyncio.wrap_future(future), PUBLISH_TIMEOUT_S)
        except (api_exceptions.GoogleAPICallError, api_exceptions.RetryError, TimeoutError) as exc:
            raise TransientError(f"results topic publish failed: {exc}") from exc
        return message_id
