"""Fault injection on the real stack: ``python -m chaos`` (``make chaos``) and ``tests/integration/test_faults.py``.

``harness.py`` owns one scenario's world (topic, versioned output buckets, jobs,
worker processes); ``accounting.py`` reads back what became of every message;
``bad_messages.py`` and ``bad_inputs.py`` make the messages and files the worker
must refuse; ``proxy.py`` and ``pubsub_proxy.py`` own the outages;
``scenarios.py`` and ``pubsub_scenarios.py`` hold the scenarios; ``__main__.py``
runs them all at full size and writes ``build/chaos.json``.
"""
