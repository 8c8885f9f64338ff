"""The last verified provider, remembered on the config volume, so a restart need not wait for the check.

Why: on a restart the ``oidc-check`` helper's imports (authlib, joserfc,
cryptography: ~0.4 s of CPU) compete with SpacetimeDB's own start on a small
node, and "ready" waited for its answer (issue 15: restart 2.3× the bare floor,
1.4× without the check).  When the very settings the check depends on were
verified at an earlier boot, readiness goes on without waiting: the check still
runs at once (at low CPU priority, so the children start first) and its answer
is acted on exactly as on a first boot: a wrong answer is still exit 78, an
unreachable provider still "unverified" and re-checked.  What changes is only
*when* readiness stops waiting; ``/status`` says ``oidc: rechecking`` meanwhile.

Not used under ``STRICT_MODE`` (there, nothing is served unverified, not even
for the half second of a re-check) nor on a first boot.  The fingerprint covers
every setting the check reads and our version (the rules may change between
versions), never a secret (the check reads none).  Stdlib only: read before
the event loop, from ``helper.prespawn``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from entrypoint.fsutil import SECRET_MODE, WriteFailed, atomic_write, read_small_file
from entrypoint.version import __version__

if TYPE_CHECKING:
    from entrypoint.config import Settings

MEMO_FILE = "oidc-verified.json"
MEMO_VERSION = 1


def memo_path(settings: Settings) -> Path:
    return settings.config_dir / MEMO_FILE


def fingerprint(settings: Settings) -> str:
    """What the verdict depends on: the settings ``check`` reads, and our version."""
    facts = {
        "version": __version__,
        "issuer": settings.oidc_issuer,
        "client_id": settings.oidc_client_id,
        "allow_http": settings.oidc_allow_http,
        "public_url": settings.public_url,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def remembered(settings: Settings) -> bool:
    """True when these settings were verified at an earlier boot and may be re-checked after ready."""
    if not settings.oidc_enabled or settings.strict_mode:
        return False
    raw = read_small_file(memo_path(settings))
    try:
        data = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):  # torn or hostile (deep nesting): wait for the check as on a first boot
        return False
    return (isinstance(data, dict) and data.get("memo_version") == MEMO_VERSION
            and data.get("fingerprint") == fingerprint(settings))


def remember(settings: Settings) -> str | None:
    """Record a verified provider (temp file + rename, mode 0600); the reason when it could not be written."""
    record = {"memo_version": MEMO_VERSION, "fingerprint": fingerprint(settings), "issuer": settings.oidc_issuer,
              "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write(memo_path(settings), json.dumps(record, indent=2) + "\n", SECRET_MODE)
    except WriteFailed as exc:  # costs only the next restart's wait: say so, never fail the run for it
        return f"{exc}; {exc.fix}"
    return None


def forget(settings: Settings) -> None:
    """The provider answered wrongly: the next boot waits for the check again."""
    with contextlib.suppress(OSError):
        memo_path(settings).unlink(missing_ok=True)
