"""Health as Kubernetes sees it, through the real Caddy on the public port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import STANDIN, Running, base_env, wait_for


def public(env: dict[str, str], path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}{path}", timeout=5)


def health(env: dict[str, str], path: str) -> httpx.Response:
    return httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}{path}", timeout=5)


def gated_spacetime(tmp: Path) -> tuple[str, Path]:
    """A SpacetimeDB whose second start waits for a ``go`` file: a restart we can hold open."""
    first, gate = tmp / "first-run-done", tmp / "go"
    fake = tmp / "spacetime"
    fake.write_text(f"""#!/bin/sh
if [ -e {first} ]; then
  while [ ! -e {gate} ]; do sleep 0.02; done
fi
touch {first}
exec "{STANDIN}" "$@"
""")
    fake.chmod(0o755)
    return str(fake), gate


def test_readyz_follows_the_children_and_livez_stays_up_during_a_restart(tmp_path: Path) -> None:
    fake, gate = gated_spacetime(tmp_path)
    env = base_env(tmp_path, SPACETIME_BIN=fake)
    with Running(env, pid1=False) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert public(env, "/readyz").status_code == 200
        assert public(env, "/livez").status_code == 200
        pid = run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "spacetimedb")[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        run.wait_event("child.exited", child="spacetimedb", timeout=30)
        down = public(env, "/readyz")
        assert down.status_code == 503
        assert any(r.startswith("spacetimedb:") for r in down.json()["not_ready"])
        assert public(env, "/livez").status_code == 200
        status = health(env, "/status").json()
        assert status["children"]["spacetimedb"]["restarts"] == 1
        gate.touch()
        run.wait_event("child.ready", child="spacetimedb", timeout=30)
        # Modules are re-checked after the restart: "unchanged", or "created" again when the
        # SIGKILL landed inside the server's 500 ms sync window and took the new database with it.
        wait_for(lambda: len(run.find(lambda e: e.get("event") in ("publish.unchanged", "publish.created"))) >= 2,
                 30, "modules re-checked")
        assert public(env, "/readyz").status_code == 200
        assert public(env, "/status").status_code == 403  # status stays on loopback
        run.stop()


@pytest.mark.pid1
def test_readyz_503_while_spacetimedb_is_not_ready(tmp_path: Path) -> None:
    stuck = tmp_path / "spacetime"
    stuck.write_text("#!/bin/sh\ntrap 'exit 0' INT\nwhile :; do sleep 0.05; done\n")
    stuck.chmod(0o755)
    env = base_env(tmp_path, SPACETIME_BIN=str(stuck), POGLY_START_TIMEOUT="60")
    with Running(env, pid1=True) as run:
        run.wait_event("child.ready", child="caddy", timeout=30)
        resp = public(env, "/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert "spacetimedb: starting" in body["not_ready"]
        assert any(r.startswith("module pogly") for r in body["not_ready"])
        assert public(env, "/livez").status_code == 200
        run.stop()


@pytest.mark.pid1
def test_readyz_turns_503_as_soon_as_shutdown_begins(tmp_path: Path) -> None:
    slow_caddy = tmp_path / "caddy"
    slow_caddy.write_text("""#!/bin/sh
if [ "$1" = validate ]; then exit 0; fi
trap '' TERM
echo '{"level":"info","msg":"serving initial configuration"}' >&2
while :; do sleep 0.05; done
""")
    slow_caddy.chmod(0o755)
    env = base_env(tmp_path, CADDY_BIN=str(slow_caddy), POGLY_STOP_TIMEOUT="6")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert health(env, "/readyz").status_code == 200
        run.signal(signal.SIGTERM)
        run.wait_event("child.stopping", child="caddy", timeout=10)
        resp = health(env, "/readyz")  # Caddy is still draining here
        assert resp.status_code == 503 and resp.json()["shutting_down"] is True
        assert health(env, "/livez").status_code == 200
        assert run.wait() == 0


@pytest.mark.pid1
def test_probe_command_reports_ready_and_live(tmp_path: Path) -> None:
    env = base_env(tmp_path)

    def probe(which: str) -> int:
        return subprocess.run([sys.executable, "-m", "entrypoint", "probe", which], env=env,
                              capture_output=True, timeout=30).returncode

    assert probe("live") == 1  # nothing running yet
    idle = subprocess.run([sys.executable, "-m", "entrypoint", "status"], env=env, capture_output=True, timeout=30)
    assert idle.returncode == 69 and b"no supervisor answers" in idle.stderr
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert probe("ready") == 0 and probe("live") == 0
        out = subprocess.run([sys.executable, "-m", "entrypoint", "status", "--json"], env=env,
                             capture_output=True, timeout=30)
        status = json.loads(out.stdout)
        assert status["modules"]["pogly"]["publish_result"] == "created"
        assert status["publisher_identity"] and status["children"]["caddy"]["state"] == "ready"
        text = subprocess.run([sys.executable, "-m", "entrypoint", "status"], env=env, capture_output=True,
                              timeout=30).stdout.decode()
        assert "spacetimedb" in text and "publish=created" in text
        run.stop()


HOSTILE = {
    "POGLY_WEB_ROOT": '/srv/x"\n\trespond 200',
    "POGLY_RUN_DIR": "/tmp/`whoami`",
    "POGLY_SPACETIME_ADDR": "127.0.0.1:3000 {$HOME}",
    "POGLY_HEALTH_ADDR": "{http.request.header.Cookie}:80",
    "POGLY_PUBLIC_URL": "https://x.example}",
    "POGLY_MODULE_DIR": "/app\nimport /etc/passwd",
    "POGLY_HTTP_PORT": "80 {",
}


@pytest.mark.parametrize("variable", sorted(HOSTILE))
def test_hostile_value_exits_78_before_anything_starts(tmp_path: Path, variable: str) -> None:
    env = base_env(tmp_path, **{variable: HOSTILE[variable]})
    proc = subprocess.run([sys.executable, "-m", "entrypoint", "run"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 78
    event = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert any(p.startswith(variable + "=") for p in event["problems"])
    assert not (tmp_path / "run" / "Caddyfile").exists()
    assert not any((tmp_path / "stdb").iterdir())  # nothing started, nothing written
