"""tritonq: a Pub/Sub to Triton Inference Server worker.

Jobs arrive on a Pub/Sub subscription, are preprocessed and sent to a
co-located Triton over one gRPC connection with many requests in flight, and
their results are written to GCS before the message is acked. See
``pipeline.py`` for the flow of one job.
"""

__version__ = "0.1.0"
