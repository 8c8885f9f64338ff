"""The OIDC verdict PID 1 acts on: fatal, verified, or unverified and re-checked until verified.

The check itself runs in a short-lived process of its own (``pogly-entrypoint
oidc-check``, see ``check.py``): authlib, joserfc and cryptography would cost
PID 1 about 10 MB of resident memory for its whole life if imported here, for a
check that runs once.  This module only starts that helper (the first one is
usually started before the event loop, ``helper.prespawn``, and adopted here),
relays its log lines as they come, reads its one-line JSON answer as soon as it
is printed (not at the helper's exit, ~100 ms of interpreter teardown later)
and decides what the answer means for the running container:

* 0 → ``verified`` (and remembered on the config volume, ``memo``);
* 78 (the provider answers, wrongly) → fatal, exit 78;
* 69 (no usable answer in time) → fatal under ``STRICT_MODE``; otherwise
  ``unverified``: serve anyway so overlays stay up, and re-check in the
  background (pauses from the one backoff, ``delays()``) until it verifies.

On a restart whose settings were verified at an earlier boot (``memo``, never
under ``STRICT_MODE``), readiness does not wait: ``rechecking`` until the same
check answers, and then the same three outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision.restart import delays

if TYPE_CHECKING:
    from entrypoint.config import Settings
    from entrypoint.oidc.helper import Spawned
    from entrypoint.supervision.process import Child, Reaper
    from entrypoint.supervision.status import Status

log = logs.get("oidc")

#: Pauses between background re-checks of an unreachable provider: 5 s doubling to 60 s, +25 % jitter.
RECHECK_FIRST_S = 5.0
RECHECK_CAP_S = 60.0
RECHECK_JITTER = 0.25
#: A background re-check gives up sooner than the first check: another one follows anyway.
RECHECK_TIMEOUT_S = 30.0
#: After its answer, how long a helper may take to exit before it is killed (it only tears down).
HELPER_EXIT_S = 10.0

DISABLED_MESSAGE = (
    "OIDC_ISSUER and OIDC_CLIENT_ID are both empty: sign-in is off (anonymous mode). The web app connects "
    "with anonymous SpacetimeDB identities, no OIDC provider is checked, and nobody becomes a database's "
    "owner by signing in first; `pogly-entrypoint owner set --identity <hex>` gives a database its owner. "
    "Set both variables to turn sign-in on."
)

Sleep = Callable[[float], Awaitable[None]]


class Prespawned:
    """The helper ``startup.run`` started before the loop: taken by ``settle``, or dropped by a stop first.

    A stop can come before ``settle`` ever runs (a signal during start-up, a
    directory that cannot be written): then nobody would wait for the helper,
    and PID 1 would find it still running when it sweeps stragglers.
    """

    def __init__(self, spawned: Spawned) -> None:
        self._spawned: Spawned | None = spawned

    def take(self) -> Spawned | None:
        spawned, self._spawned = self._spawned, None
        return spawned

    def drop(self) -> None:
        """Kill it unless ``settle`` took it (then cancelling ``settle`` does); its exit is reaped as usual."""
        spawned = self.take()
        if spawned is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(spawned.pid, signal.SIGKILL)
        for fd in (spawned.stdout, spawned.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
        spawned.settings_file.unlink(missing_ok=True)


async def settle(settings: Settings, status: Status, reaper: Reaper, checked: asyncio.Event, *,
                 sleep: Sleep = asyncio.sleep, early: Prespawned | None = None) -> None:
    """Decide the OIDC verdict, set ``checked`` once readiness may count on it, keep re-checking if unverified.

    ``early``: the first helper, already started before the event loop
    (``helper.prespawn``), unless a stop dropped it; otherwise the first check starts one.  Raises
    ``Fatal`` when the provider's answer is wrong (78) or, under
    ``STRICT_MODE``, when there is no answer in time (69).  Returns once the
    provider is verified (or OIDC is off).
    """
    if not settings.oidc_enabled:
        status.oidc = "disabled"
        checked.set()
        log.warning("oidc.disabled", message=DISABLED_MESSAGE)
        return
    from entrypoint.oidc import memo

    spawned = early.take() if early is not None else None
    provisional = spawned.provisional if spawned is not None else memo.remembered(settings)
    if provisional:
        status.oidc = "rechecking"
        checked.set()
        log.info("oidc.rechecking", issuer=settings.oidc_issuer,
                 message="these settings were verified at an earlier boot: ready without waiting; checking again now")
    code, result = await ask_helper(settings, reaper, settings.oidc_discovery_timeout, early=spawned,
                                    background=provisional)
    if code == 0:
        status.oidc = "verified"
        checked.set()
        _remember(settings)
        return
    message = str(result.get("message") or f"oidc-check exited {code}")
    if code == EXIT_CONFIG:
        status.oidc = "failed"
        memo.forget(settings)
        if provisional:
            message += " (these settings were verified at an earlier boot: the provider has changed since)"
        raise Fatal(EXIT_CONFIG, message, event="oidc.invalid", reason=result.get("reason"))
    if settings.strict_mode:
        status.oidc = "failed"
        raise Fatal(EXIT_UNAVAILABLE, f"{message} (STRICT_MODE=true: refusing to serve unverified)",
                    event="oidc.unavailable")
    status.oidc = "unverified"
    checked.set()
    log.error("oidc.unverified", issuer=settings.oidc_issuer, message=message,
              action="serving anyway so overlays stay up; re-checking in the background")
    for pause in delays(RECHECK_FIRST_S, RECHECK_CAP_S, jitter=RECHECK_JITTER):
        await sleep(pause)
        code, result = await ask_helper(settings, reaper, min(settings.oidc_discovery_timeout, RECHECK_TIMEOUT_S))
        if code == 0:
            status.oidc = "verified"
            _remember(settings)
            return
        if code == EXIT_CONFIG:
            memo.forget(settings)  # whatever an earlier boot verified, the next one waits for the check
            log.error("oidc.invalid", message=result.get("message"), action="still serving; re-checking")


def _remember(settings: Settings) -> None:
    from entrypoint.oidc import memo

    problem = memo.remember(settings)
    if problem is not None:
        log.warning("oidc.memo_unwritable", message=problem,
                    action="serving as usual; the next restart waits for the provider check again")


async def ask_helper(settings: Settings, reaper: Reaper, timeout: float,
                     early: Spawned | None = None, *, background: bool = False) -> tuple[int, dict[str, Any]]:
    """One ``oidc-check`` process (``early``'s, else a new one); its exit code (0, 78 or 69) and JSON answer.

    Its stderr (progress events as JSON lines) is relayed into our log under
    ``service=oidc`` line by line.  A success is acted on as soon as its line
    is printed; the helper's exit is then awaited in the background (its last
    lines relayed, its settings file removed).  A failure waits for the exit
    code, which tells 78 from 69.  A helper that dies without an answer counts
    as 69 ("no usable answer"), never as a verdict about the provider.
    """
    from entrypoint.oidc import helper
    from entrypoint.supervision.process import Child, ChildSpec

    output = _HelperOutput()
    if early is None:
        path = helper.write_settings(settings)  # Fatal 78 naming POGLY_RUN_DIR when it cannot be written
        spec = ChildSpec("oidc-check", helper.command(path, timeout), helper.environment(), signal.SIGKILL, 0)
        child = Child(spec, reaper, output)
    else:  # already running: "starting" it hands over its pid and pipes
        path = early.settings_file
        spec = ChildSpec("oidc-check", helper.command(path, timeout), {}, signal.SIGKILL, 0)
        handed = (early.pid, early.stdout, early.stderr)
        child = Child(spec, reaper, output, lambda *_: handed)
    limit = timeout + 10.0
    try:
        child.start()
    except OSError as exc:
        path.unlink(missing_ok=True)
        return EXIT_UNAVAILABLE, {"message": f"the OIDC check process could not be started: {exc}"}
    if background and early is None and child.pid is not None:  # an adopted one was lowered at its spawn
        helper.lower_priority(child.pid)
    exited = asyncio.ensure_future(child.wait())
    try:
        async with asyncio.timeout(limit):
            await asyncio.wait({exited, output.answer}, return_when=asyncio.FIRST_COMPLETED)
            if output.answer.done() and output.answer.result().get("ok") is True:
                _finish_in_background(child, exited, path)
                return 0, output.answer.result()
            code = await exited
    except TimeoutError:
        await child.stop(0)
        path.unlink(missing_ok=True)
        return EXIT_UNAVAILABLE, {"message": f"the OIDC check process did not finish within {limit:g} s"}
    except asyncio.CancelledError:
        child.signal_group(signal.SIGKILL)  # a shutdown must not leave it behind
        await asyncio.shield(exited)
        path.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)
    if output.answer.done():
        return code if code in (EXIT_CONFIG, EXIT_UNAVAILABLE) else EXIT_UNAVAILABLE, output.answer.result()
    err = "\n".join(output.stderr_tail)
    return EXIT_UNAVAILABLE, {"message": f"the OIDC check process failed ({code}): {err[-300:]}"}


class _HelperOutput:
    """The helper's lines as they come: stderr relayed into our log, the first JSON object on stdout kept."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stderr_tail: list[str] = []  # the last few, for a helper that dies without an answer

    def __call__(self, stream: str, raw: bytes, truncated: bool) -> None:
        text = raw.decode("utf-8", "replace")
        if stream == "stderr":
            self.stderr_tail = [*self.stderr_tail[-9:], text]
            level, fields = logs.child_event("oidc", "stderr", text)
            logs.emit(level, fields)
            return
        if self.answer.done():
            return
        try:
            data = json.loads(text)
        except ValueError:
            return
        if isinstance(data, dict):
            self.answer.set_result(data)


_BACKGROUND: set[asyncio.Future[Any]] = set()  # the loop keeps only weak references to tasks


def _finish_in_background(child: Child, exited: asyncio.Future[int], path: Path) -> None:
    """After a success: relay the helper's last lines, see it exit (bounded), remove its settings file."""

    async def finish() -> None:
        try:
            async with asyncio.timeout(HELPER_EXIT_S):
                await asyncio.shield(exited)
        except TimeoutError:
            await child.stop(0)
        finally:
            path.unlink(missing_ok=True)

    task = asyncio.ensure_future(finish())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
