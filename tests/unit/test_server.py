"""The probes' HTTP answers, on a loopback port the OS picks."""

from __future__ import annotations

import aiohttp

from worker.server import HttpServer


async def test_healthz_answers_503_with_the_reason_once_the_worker_cannot_work() -> None:
    failure: list[str] = []

    async def ready() -> str | None:
        return None

    server = HttpServer(0, ready, lambda: None, lambda: failure[0] if failure else None)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/healthz"
            async with session.get(url) as response:
                assert (response.status, await response.json()) == (200, {"status": "ok"})
            failure.append("consumer gave up: NOT_FOUND")
            async with session.get(url) as response:
                assert response.status == 503
                assert await response.json() == {"status": "failed", "reason": "consumer gave up: NOT_FOUND"}
    finally:
        await server.stop()
