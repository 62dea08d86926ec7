"""The worker's HTTP face: ``/metrics``, ``/healthz`` and ``/readyz`` (aiohttp).

``/healthz`` answers 200 while the event loop turns and the worker can still
work (the liveness probe), 503 once it cannot (its consumer gave up);
``/readyz`` answers 200 only while Triton is ready for every routed model and
the consumer is pulling, and 503 with a JSON reason otherwise, for example
during shutdown, so Kubernetes stops counting the pod as serving.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

#: Returns ``None`` when ready, else the reason it is not.
ReadinessCheck = Callable[[], Awaitable[str | None]]


class HttpServer:
    """``start()`` binds the port, ``stop()`` releases it."""

    def __init__(
        self,
        port: int,
        readiness: ReadinessCheck,
        before_scrape: Callable[[], None],
        liveness: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._port = port
        self._readiness = readiness
        self._liveness = liveness
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HttpServer already started")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "0.0.0.0", self._port)
        await site.start()
        # Port 0 lets the OS pick (tests): report the one bound.
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        self._before_scrape()
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        reason = self._liveness()
        if reason is None:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "failed", "reason": reason}, status=503)

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = await self._readiness()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready", "reason": reason}, status=503)
