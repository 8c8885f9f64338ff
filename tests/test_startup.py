"""The start path: SpacetimeDB is spawned before asyncio (or anything heavy) is imported.

``cli → config → startup → supervision.spawn → spacetimedb.server`` must stay
free of asyncio, structlog and the supervisor: that import time (~80 ms) is
what SpacetimeDB, the child slowest to be ready, would otherwise wait for.
The real ``pogly-entrypoint run`` is executed with those modules made
unimportable and ``posix_spawn`` replaced by a probe that reports and exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO, base_env

PROBE = """
import json, os, sys
for name in ("asyncio", "structlog", "httpx", "jinja2"):
    sys.modules[name] = None  # importing one of them from here on raises ImportError

from entrypoint.spacetimedb import server

def spawn(argv, env, cwd=None):
    loaded = sorted(m for m in sys.modules if m.startswith("entrypoint"))
    print(json.dumps({"argv": argv, "loaded": loaded}), flush=True)
    os._exit(0)

server.spawn = spawn
from entrypoint.__main__ import main
sys.argv = ["pogly-entrypoint", "run"]
main()
"""


def test_spacetimedb_is_spawned_before_asyncio_is_imported(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["argv"][:2] == [env["SPACETIME_BIN"], "start"]
    assert "entrypoint.supervision.supervisor" not in report["loaded"]
    assert "entrypoint.logs" not in report["loaded"]


PROBE_OIDC = """
import json, os, stat, sys
for name in ("asyncio", "structlog", "httpx", "jinja2", "authlib"):
    sys.modules[name] = None  # importing one of them from here on raises ImportError

from entrypoint.oidc import helper
from entrypoint.spacetimedb import server

spawned = []

def spacetime(argv, env, cwd=None):
    spawned.append("spacetimedb")
    return os.getpid(), os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_RDONLY)

def oidc(argv, env, cwd=None):
    spawned.append("oidc-check")
    handed = argv[argv.index("--settings") + 1]
    loaded = sorted(m for m in sys.modules if m.startswith("entrypoint"))
    print(json.dumps({"argv": argv, "order": spawned, "loaded": loaded, "unbuffered": env.get("PYTHONUNBUFFERED"),
                      "mode": stat.S_IMODE(os.stat(handed).st_mode),
                      "issuer": json.load(open(handed))["oidc_issuer"]}), flush=True)
    os._exit(0)

server.spawn = spacetime
helper.spawn = oidc
from entrypoint.__main__ import main
sys.argv = ["pogly-entrypoint", "run"]
main()
"""


def test_oidc_check_helper_is_spawned_right_after_spacetimedb_before_asyncio(tmp_path: Path) -> None:
    """Issue 15: the OIDC verdict was late because its helper started only once the event loop ran."""
    env = base_env(tmp_path, OIDC_ISSUER="https://auth.example.com/application/o/pogly/")
    out = subprocess.run([sys.executable, "-c", PROBE_OIDC], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["order"] == ["spacetimedb", "oidc-check"]
    assert report["argv"][1:4] == ["-m", "entrypoint", "oidc-check"]
    assert report["mode"] == 0o600 and report["issuer"] == env["OIDC_ISSUER"]  # the resolved settings, private
    assert report["unbuffered"] == "1"  # its answer reaches us when printed, not at its exit
    assert "entrypoint.logs" not in report["loaded"]
    assert "entrypoint.supervision.supervisor" not in report["loaded"]
