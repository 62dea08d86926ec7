"""Fault injection on the real stack: ``python -m chaos`` (``make chaos``) and ``tests/integration/test_faults.py``.

``harness.py`` owns one scenario's world (topic, versioned output bucket, jobs,
worker processes) and the accounting of what became of every message;
``proxy.py`` owns the storage outage; ``scenarios.py`` and ``pubsub_scenarios.py`` hold the
scenarios; ``__main__.py`` runs them all at full size and writes
``build/chaos.json``.
"""
