"""Readiness an anonymous client cannot flip (issue 13, fault 2).

Caddy opens one upstream connection per in-flight request; the health server
used to refuse connections past 64 with 503 "too many connections", so 150
concurrent ``GET /readyz`` on the public port made Kubernetes see "not ready".
Whole program, stand-in SpacetimeDB, real Caddy; every request on 127.0.0.1,
every loop bounded.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from tests.harness import ENTRYPOINT, REPO, Running, base_env
from tests.reliability.support import flood, get

KUBELET_TIMEOUT = 1.0  # a readiness probe's default timeoutSeconds


async def _probe_while(port: int, busy: asyncio.Task[object]) -> list[int | str]:
    """kubelet-style: GET /readyz on the public port, 1 s timeout, over and over until ``busy`` is done."""
    results: list[int | str] = []
    while not busy.done() or not results:
        started = time.monotonic()
        try:
            code, _ = await get(port, "/readyz", timeout=KUBELET_TIMEOUT)
        except TimeoutError:
            code = "timeout"
        results.append(code)
        if code != 200:
            break
        await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))  # pacing, not synchronisation
    return results


def test_flood_of_readyz_on_the_public_port_does_not_flip_readiness(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)

        async def scenario() -> tuple[object, list[int | str]]:
            load = asyncio.create_task(flood(port, "/readyz", concurrency=300, rounds=4))
            probes = await _probe_while(port, load)
            return await load, probes

        codes, probes = asyncio.run(scenario())
        assert codes == {200: 1200}, codes
        assert set(probes) == {200}, probes
        # the exec probe (Docker HEALTHCHECK, `kubectl exec`) on the loopback health address
        probe = subprocess.run([*ENTRYPOINT, "probe", "ready"], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=30)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        run.stop()


def test_slow_request_bodies_through_caddy_do_not_hold_the_health_server(tmp_path: Path) -> None:
    """Requests that trickle a body must not hold the health server's connections for its deadline."""
    env = base_env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)

        async def scenario() -> list[int | str]:
            held = []
            for _ in range(80):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nx")
                await writer.drain()
                held.append((reader, writer))
            try:
                results = []
                for _ in range(20):
                    try:
                        results.append((await get(port, "/readyz", timeout=KUBELET_TIMEOUT))[0])
                    except TimeoutError:
                        results.append("timeout")
                return results
            finally:
                for _, writer in held:
                    writer.close()

        assert set(asyncio.run(scenario())) == {200}
        run.stop()
