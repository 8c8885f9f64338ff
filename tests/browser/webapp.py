"""The stand-in for the Pogly web app, assembled into a web root (``POGLY_WEB_ROOT``).

One place for the browser test (tests/test_browser.py) and ``make run`` (tests/devrun.py): the page
in ``tests/browser/page`` plus the browser build of ``oidc-client-ts`` from ``tests/js/node_modules``
(pinned in tests/js/package.json to the version upstream's package-lock.json resolves).  The layout
is a built web app's: ``index.html`` and ``silent-oidc-renew.html`` at the root, scripts under
``assets/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PAGE = REPO / "tests" / "browser" / "page"
OIDC_CLIENT_JS = REPO / "tests/js/node_modules/oidc-client-ts/dist/browser/oidc-client-ts.min.js"
# Where the page reads the runtime config (the test checks the key names in this file).
RUNTIME_CONFIG_READER = PAGE / "assets" / "oidc.js"


def missing() -> str | None:
    """Why the stand-in cannot be assembled here, or ``None``."""
    if not OIDC_CLIENT_JS.exists():
        return f"oidc-client-ts is not installed ({OIDC_CLIENT_JS} missing): run `npm ci --prefix tests/js`"
    return None


def assemble(dest: Path) -> Path:
    """Write the stand-in web app into ``dest`` (replacing what was there) and return ``dest``."""
    problem = missing()
    if problem:
        raise FileNotFoundError(problem)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(PAGE, dest)
    shutil.copy(OIDC_CLIENT_JS, dest / "assets" / OIDC_CLIENT_JS.name)
    return dest
