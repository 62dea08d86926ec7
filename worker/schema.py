"""The jobs topic's Pub/Sub schema: ``ImageJob`` from ``protos/job.proto``, registered with JSON encoding.

With the schema on the topic, Pub/Sub itself rejects a malformed job at publish
time, before any worker sees it. The worker still validates everything: the
emulator does not implement protobuf schemas, and older topics may have none.
A protobuf schema holds one self-contained message, so the definition is the
contract file with ``JobResult`` (the worker's output, not a message on this
topic) left out.
"""

from __future__ import annotations

import re
from importlib import resources

SCHEMA_SUFFIX = "-schema"
_RESULT_MESSAGE = re.compile(r"\n(?://[^\n]*\n)*message JobResult \{.*?\n\}\n", re.S)


def definition() -> str:
    """The schema definition: the contract with only ``ImageJob`` in it."""
    text = resources.files("worker.proto").joinpath("job.proto").read_text()
    return _RESULT_MESSAGE.sub("\n", text)


def gcloud_commands(project: str, topic: str) -> list[str]:
    """The same as ``tritonq schema apply``, as gcloud lines (the README shows these)."""
    schema = f"{topic}{SCHEMA_SUFFIX}"
    return [
        "tritonq schema show > job_schema.proto",
        f"gcloud pubsub schemas create {schema} --project={project} --type=protocol-buffer "
        "--definition-file=job_schema.proto",
        f"gcloud pubsub topics update {topic} --project={project} --schema={schema} --message-encoding=json",
    ]


def apply(project: str, topic: str) -> str:
    """Create (or reuse) the schema and attach it to the topic with JSON encoding; returns its name."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1
    from google.pubsub_v1.types import Encoding, Schema

    schemas = pubsub_v1.SchemaServiceClient()
    name = f"projects/{project}/schemas/{topic}{SCHEMA_SUFFIX}"
    try:
        schemas.create_schema(
            request={
                "parent": f"projects/{project}",
                "schema": Schema(type_=Schema.Type.PROTOCOL_BUFFER, definition=definition()),
                "schema_id": f"{topic}{SCHEMA_SUFFIX}",
            }
        )
    except exceptions.AlreadyExists:
        schemas.commit_schema(
            request={"name": name, "schema": Schema(type_=Schema.Type.PROTOCOL_BUFFER, definition=definition())}
        )
    publisher = pubsub_v1.PublisherClient()
    publisher.update_topic(
        request={
            "topic": {
                "name": publisher.topic_path(project, topic),
                "schema_settings": {"schema": name, "encoding": Encoding.JSON},
            },
            "update_mask": {"paths": ["schema_settings"]},
        }
    )
    return name
