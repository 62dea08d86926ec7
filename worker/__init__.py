"""tritonq: a Pub/Sub to Triton Inference Server worker.

Jobs arrive on a Pub/Sub subscription, are preprocessed and sent over one
long-lived gRPC stream to a co-located Triton, and their results are written
to GCS before the message is acked. See ``pipeline.py`` for the flow of one job.
"""

__version__ = "0.1.0"
