"""The development package: what runs the product locally, never shipped in the worker image.

| module | owns |
| --- | --- |
| ``probe.py`` | free ports, the HTTP readiness probe, polling against a deadline |
| ``components.py`` | the Pub/Sub emulator, the GCS emulator and Triton, each a child process |
| ``stack.py`` | the three started together, provisioned (``worker.provision``), their environment; ``tritonq stack`` |
| ``worker_process.py`` | ``tritonq run`` as a child process, as it runs in a pod |
| ``samples.py`` | deterministic photo-like sample images |
| ``demo.py`` | ``tritonq demo`` / ``make demo``: sample jobs end to end, a table of results |

The worker package (``worker/``) never imports this one; ``tritonq stack`` and
``tritonq demo`` import it when it is installed (an editable install of the
repository, ``make install``).
"""
