"""The OIDC verdict PID 1 acts on: fatal, verified, or unverified and re-checked until verified.

The check itself runs in a short-lived process of its own (``pogly-entrypoint
oidc-check``, see ``check.py``): authlib, joserfc and cryptography would cost
PID 1 about 10 MB of resident memory for its whole life if imported here, for a
check that runs once.  This module only starts that helper, relays its log
lines, reads its one-line JSON answer and decides what the answer means for the
running container:

* 0 → ``verified``;
* 78 (the provider answers, wrongly) → fatal, exit 78;
* 69 (no usable answer in time) → fatal under ``STRICT_MODE``; otherwise
  ``unverified``: serve anyway so overlays stay up, and re-check in the
  background (pauses from the one backoff, ``delays()``) until it verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision.restart import delays

if TYPE_CHECKING:
    from entrypoint.config import Settings
    from entrypoint.supervision.process import Reaper
    from entrypoint.supervision.status import Status

log = logs.get("oidc")

#: Pauses between background re-checks of an unreachable provider: 5 s doubling to 60 s, +25 % jitter.
RECHECK_FIRST_S = 5.0
RECHECK_CAP_S = 60.0
RECHECK_JITTER = 0.25
#: A background re-check gives up sooner than the first check: another one follows anyway.
RECHECK_TIMEOUT_S = 30.0

DISABLED_MESSAGE = (
    "OIDC_ISSUER and OIDC_CLIENT_ID are both empty: sign-in is off (anonymous mode). The web app connects "
    "with anonymous SpacetimeDB identities, no OIDC provider is checked, and nobody becomes a database's "
    "owner by signing in first; `pogly-entrypoint owner set --identity <hex>` gives a database its owner. "
    "Set both variables to turn sign-in on."
)

Sleep = Callable[[float], Awaitable[None]]


async def settle(settings: Settings, status: Status, reaper: Reaper, checked: asyncio.Event, *,
                 sleep: Sleep = asyncio.sleep) -> None:
    """Decide the OIDC verdict, set ``checked`` once readiness may count on it, keep re-checking if unverified.

    Raises ``Fatal`` when the provider's answer is wrong (78) or, under
    ``STRICT_MODE``, when there is no answer in time (69).  Returns once the
    provider is verified (or OIDC is off).
    """
    if not settings.oidc_enabled:
        status.oidc = "disabled"
        checked.set()
        log.warning("oidc.disabled", message=DISABLED_MESSAGE)
        return
    code, result = await ask_helper(settings, reaper, settings.oidc_discovery_timeout)
    if code == 0:
        status.oidc = "verified"
        checked.set()
        return
    message = str(result.get("message") or f"oidc-check exited {code}")
    if code == EXIT_CONFIG:
        status.oidc = "failed"
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
            return
        if code == EXIT_CONFIG:
            log.error("oidc.invalid", message=result.get("message"), action="still serving; re-checking")


async def ask_helper(settings: Settings, reaper: Reaper, timeout: float) -> tuple[int, dict[str, Any]]:
    """Run one ``oidc-check`` process; its exit code (0, 78 or 69) and its JSON answer.

    Its stderr (progress events as JSON lines) is relayed into our log under
    ``service=oidc``.  A helper that dies without an answer counts as 69
    ("no usable answer"), never as a verdict about the provider.
    """
    import tempfile

    from entrypoint.fsutil import WriteFailed
    from entrypoint.supervision.process import run_capture

    # The helper checks the settings we resolved, handed over as JSON, instead of re-reading the
    # environment.  A private file (mode 0600, in the run dir, gone when the helper is) because our
    # children's stdin is /dev/null; the environment still goes along for proxies and CA bundles.
    try:
        handed = tempfile.NamedTemporaryFile("w", dir=settings.run_dir, prefix=".oidc-check-", suffix=".json")  # noqa: SIM115
    except OSError as exc:
        raise WriteFailed(settings.run_dir / ".oidc-check-*.json", exc).fatal("POGLY_RUN_DIR",
                                                                             settings.run_dir) from exc
    with handed:
        try:
            json.dump(settings.to_json(), handed)
            handed.flush()
        except OSError as exc:
            raise WriteFailed(Path(handed.name), exc).fatal("POGLY_RUN_DIR", settings.run_dir) from exc
        argv = [sys.executable, "-m", "entrypoint", "oidc-check", "--settings", handed.name,
                "--timeout", f"{timeout:g}"]
        try:
            code, out, err = await run_capture(argv, dict(os.environ), timeout + 10.0, reaper)
        except TimeoutError:
            return EXIT_UNAVAILABLE, {"message": f"the OIDC check process did not finish within {timeout + 10.0:g} s"}
    for line in err.decode("utf-8", "replace").splitlines():
        level, fields = logs.child_event("oidc", "stderr", line)
        logs.emit(level, fields)
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"message": f"the OIDC check process failed ({code}): {err.decode(errors='replace')[-300:]}"}
        code = code if code in (EXIT_CONFIG, EXIT_UNAVAILABLE) else EXIT_UNAVAILABLE
    return code, result
