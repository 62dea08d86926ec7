"""``python -m chaos``: start the real stack, run every scenario at full size, write ``build/chaos.json``.

The ``pubsub_*`` scenarios pull through ``chaos/pubsub_proxy.py``, which plays
the real service's faults (streams ended, IAM denials, a deleted subscription,
slow or failed acks) in front of the emulator.

The stack serves only the ``enhance`` model (a copy of its folder from
``triton/model_repository``), so restarting Triton in the Triton scenario
takes seconds, not the minutes of loading every model on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from chaos import pubsub_scenarios, scenarios
from chaos.accounting import Report, verify_duplicate_detection
from chaos.harness import MODEL
from chaos.pubsub_proxy import PubsubFaults
from devstack.components import DEFAULT_MODEL_REPOSITORY
from devstack.stack import Stack
from worker.config import Settings

OUTPUT = Path("build/chaos.json")
STATE_DIR = Path("build/chaos-stack")
COLUMNS = ("scenario", "published", "succeeded", "failed_permanent", "lost", "duplicate_results", "seconds")


def _scenarios(stack: Stack, workdir: Path, small: bool) -> dict[str, Callable[[], Coroutine[Any, Any, Report]]]:
    def n(full: int, reduced: int) -> int:
        return reduced if small else full

    return {
        "worker_killed": lambda: scenarios.worker_killed(stack, workdir, jobs=n(1000, 150), kills=3),
        "triton_restarted": lambda: scenarios.triton_restarted(stack, workdir, stack.triton, jobs=n(500, 200)),
        "storage_outage": lambda: scenarios.storage_outage(stack, workdir, jobs=n(500, 200)),
        "bad_messages": lambda: scenarios.bad_messages(stack, workdir, jobs=n(900, 108)),
        "sigterm": lambda: scenarios.sigterm(stack, workdir, jobs=n(500, 120)),
        "backlog_memory": lambda: scenarios.backlog_memory(stack, workdir, backlog=n(5000, 600)),
        "pubsub_streams_closed": lambda: pubsub_scenarios.streams_closed(stack, workdir, jobs=n(500, 100)),
        "pubsub_permission_denied": lambda: pubsub_scenarios.through_proxy(
            stack, workdir, "pubsub_permission_denied", PubsubFaults(deny_for_s=20.0), jobs=n(500, 100)
        ),
        "pubsub_not_found": lambda: pubsub_scenarios.not_found(stack, workdir, jobs=n(500, 100)),
        "pubsub_settle_delayed": lambda: pubsub_scenarios.through_proxy(
            stack, workdir, "pubsub_settle_delayed", PubsubFaults(delay_settle_s=5.0), jobs=n(500, 100)
        ),
        "pubsub_acks_dropped": lambda: pubsub_scenarios.through_proxy(
            stack, workdir, "pubsub_acks_dropped", PubsubFaults(drop_ack_share=0.3), jobs=n(500, 100)
        ),
    }


def _table(reports: list[Report]) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS, *(tuple(str(getattr(r, c)) for c in COLUMNS) for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable)")
    parser.add_argument("--small", action="store_true", help="the test suite's sizes, for a quick look")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    started = time.monotonic()
    state = STATE_DIR.resolve()
    shutil.rmtree(state, ignore_errors=True)
    repository = state / "model_repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / MODEL, repository / MODEL)
    # The memory backend keeps object versions, which the accounting counts.
    stack = Stack(state_dir=state, model_repository=repository, gcs_backend="memory")
    base = Settings()
    reports: list[Report] = []
    try:
        stack.start(progress=lambda text: print(f"chaos: {text}", flush=True))
        stack.provision(base)
        with stack.environ(base):
            asyncio.run(verify_duplicate_detection(stack))
            chosen = _scenarios(stack, state / "logs", args.small)
            for name, scenario in chosen.items():
                if args.only and name not in args.only:
                    continue
                print(f"chaos: running {name}", flush=True)
                report = asyncio.run(scenario())
                print(f"chaos: {json.dumps(report.as_dict())}", flush=True)
                reports.append(report)
    finally:
        stack.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
    print(_table(reports))
    memory = [r.peak_rss_mb for r in reports if r.scenario == "backlog_memory"]
    if memory:
        print(f"peak RSS of the worker with a {5000 if not args.small else 600}-message backlog: {memory[0]} MB")
    print(f"chaos: wrote {args.output} in {time.monotonic() - started:.0f} s")
    clean = all(r.lost == 0 and r.duplicate_results == 0 and r.bad_unaccounted == 0 for r in reports)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
