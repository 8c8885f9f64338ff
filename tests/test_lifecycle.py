"""SpacetimeDB lifecycle through the whole program: locks, identity across restarts, durability.

The stand-in reproduces the real server's flock on ``spacetime.pid``, its
identity rules and its 500 ms commit-log sync, so these tests fail exactly
where the real thing would lose data or refuse a publish.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.harness import STANDIN, Running, base_env, free_port, wait_for


def token(env: dict[str, str]) -> str:
    return tomllib.loads((Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())["spacetimedb_token"]


def stdb_url(env: dict[str, str]) -> str:
    return f"http://{env['POGLY_SPACETIME_ADDR']}"


def sql(env: dict[str, str], statement: str) -> list[list[object]]:
    resp = httpx.post(f"{stdb_url(env)}/v1/database/pogly/sql", content=statement,
                      headers={"Authorization": f"Bearer {token(env)}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()[0]["rows"]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in ("spacetime-standalone.log",):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Holder:
    """Another SpacetimeDB (the stand-in) holding the data dir's lock, started by the test."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(STANDIN), "start", "--data-dir", env["POGLY_DATA_DIR"], "--jwt-key-dir", env["POGLY_CONFIG_DIR"],
             "--listen-addr", f"127.0.0.1:{free_port()}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # until it serves, i.e. holds the lock
            if b"Starting SpacetimeDB listening on" in line:
                break

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(20)


def test_lock_held_by_another_server_is_waited_out(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    holder = Holder(env)
    pidfile = Path(env["POGLY_DATA_DIR"]) / "spacetime.pid"
    inode = pidfile.stat().st_ino
    try:
        with Running(env, pid1=False) as run:
            held = run.wait_event("spacetime.lock_held", timeout=30)
            assert held["holder_pid"] == holder.proc.pid
            assert pidfile.stat().st_ino == inode  # never deleted or replaced
            run.wait_event("spacetime.lock_held", timeout=30)  # still waiting, retrying with backoff
            holder.stop()  # it removes its own pidfile on a clean exit, as the real server does
            run.wait_event("entrypoint.ready", timeout=60)
            run.stop()
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()


def test_lock_held_forever_exits_69_naming_the_pid(tmp_path: Path) -> None:
    env = base_env(tmp_path, POGLY_LOCK_WAIT="2")
    holder = Holder(env)
    pidfile = Path(env["POGLY_DATA_DIR"]) / "spacetime.pid"
    inode = pidfile.stat().st_ino
    try:
        with Running(env) as run:
            assert run.wait(60) == 69
        timeout = run.find(lambda e: e.get("event") == "spacetime.lock_timeout")[0]
        assert timeout["holder_pid"] == holder.proc.pid
        assert str(holder.proc.pid) in timeout["message"] and "Recreate" in timeout["message"]
        assert "Do NOT delete" in timeout["message"]
        assert holder.proc.poll() is None  # the other server was left alone
        assert pidfile.stat().st_ino == inode
        assert len(run.find(lambda e: e.get("event") == "spacetime.lock_held")) >= 2
    finally:
        holder.stop()


@pytest.mark.pid1
def test_stale_pidfile_with_dead_pid_does_not_block(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    data = Path(env["POGLY_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    (data / "spacetime.pid").write_text("999999")
    inode = (data / "spacetime.pid").stat().st_ino
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert (data / "spacetime.pid").stat().st_ino == inode
        assert (data / "spacetime.pid").read_text() != "999999"
        run.stop()
    assert not run.find(lambda e: e.get("event") == "spacetime.lock_held")


def test_leftover_server_from_an_earlier_run_of_ours_is_stopped_with_sigint(tmp_path: Path) -> None:
    mark = tmp_path / "leftover-started"
    fake = tmp_path / "spacetime"
    # First start: leave an orphaned server holding the lock (as a crashed earlier
    # run would), re-parented to us as subreaper; then try to start normally.
    fake.write_text(f"""#!/bin/sh
if [ ! -e {mark} ]; then
  touch {mark}
  ( setsid "{STANDIN}" "$@" --listen-addr 127.0.0.1:0 > {tmp_path}/leftover.log 2>&1 & )
  while ! grep -q 'Starting SpacetimeDB listening' {tmp_path}/leftover.log 2>/dev/null; do sleep 0.01; done
fi
exec "{STANDIN}" "$@"
""")
    fake.chmod(0o755)
    env = base_env(tmp_path, SPACETIME_BIN=str(fake))
    with Running(env) as run:
        leftover = run.wait_event("spacetime.leftover_stopping", timeout=30)
        run.wait_event("entrypoint.ready", timeout=60)
        assert "Shutting down server" in (tmp_path / "leftover.log").read_text()  # it got SIGINT
        assert not Path(f"/proc/{leftover['holder_pid']}").exists() or wait_for(
            lambda: not Path(f"/proc/{leftover['holder_pid']}").exists(), 5, "leftover gone")
        run.stop()


@pytest.mark.pid1
def test_three_restarts_keep_one_identity_and_skip_unchanged_publish(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    seen = []
    for boot in range(3):
        with Running(env, pid1=True) as run:
            run.wait_event("entrypoint.ready", timeout=60)
            publish = run.find(lambda e: str(e.get("event", "")).startswith("publish.")
                               and e.get("event") != "publish.start")[0]
            ident = run.find(lambda e: e.get("event") in ("identity.created", "identity.reused"))[0]
            seen.append((boot, publish["event"], publish.get("database_identity"), ident["identity"],
                         ident["event"]))
            run.stop()
    assert [s[1] for s in seen] == ["publish.created", "publish.unchanged", "publish.unchanged"]
    assert [s[4] for s in seen] == ["identity.created", "identity.reused", "identity.reused"]
    assert len({s[3] for s in seen}) == 1 and len({s[2] for s in seen}) == 1
    # A new module release publishes an update under the same identity.
    wasm = Path(env["POGLY_MODULE_DIR"]) / "pogly.wasm"
    wasm.write_bytes(wasm.read_bytes() + b"\x00\x0bpogly-v2")
    with Running(env, pid1=True) as run:
        updated = run.wait_event("publish.updated", timeout=60)
        assert updated["database_identity"] == seen[0][2]
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()


@pytest.mark.pid1
def test_swapped_keys_exit_78_naming_both_identities_and_touch_no_data(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    config = Path(env["POGLY_CONFIG_DIR"])
    other = base_env(tmp_path / "other")
    with Running(other, pid1=True) as run:  # a second installation: its own keys
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    for key in ("id_ecdsa", "id_ecdsa.pub"):
        shutil.copy(Path(other["POGLY_CONFIG_DIR"]) / key, config / key)
    before = tree_digest(Path(env["POGLY_DATA_DIR"]))
    ours = tomllib.loads((config / "cli.toml").read_text())
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "identity.token_rejected")[0]
    assert fatal["exit_code"] == 78
    assert tree_digest(Path(env["POGLY_DATA_DIR"])) == before
    assert tomllib.loads((config / "cli.toml").read_text()) == ours  # nothing rewritten
    assert "restore" in fatal["message"].lower()


def _write_items(env: dict[str, str], count: int) -> None:
    """``count`` acknowledged reducer calls (each answered 200 by the server)."""
    headers = {"Authorization": f"Bearer {token(env)}", "Content-Type": "application/json"}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=stdb_url(env), headers=headers, timeout=30) as client:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with sem:
                    resp = await client.post("/v1/database/pogly/call/insert_item", json=[f"item-{i}"])
                    assert resp.status_code == 200, resp.text

            await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(main())


@pytest.mark.pid1
def test_sigterm_to_pid1_right_after_1000_writes_loses_nothing(tmp_path: Path) -> None:
    env = base_env(tmp_path, STANDIN_FLUSH_INTERVAL_MS="500")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        _write_items(env, 1000)
        run.stop()
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert len(sql(env, "SELECT * FROM Items")) == 1000
        run.stop()


@pytest.mark.pid1
def test_sigterm_straight_to_spacetimedb_loses_recent_writes(tmp_path: Path) -> None:
    """The control experiment: what tini/dumb-init would do. Proves the test above can fail."""
    env = base_env(tmp_path)
    with Running(env, pid1=True) as run:  # first boot publishes; a clean stop makes it durable
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    env["STANDIN_FLUSH_INTERVAL_MS"] = "5000"  # one sync window covers all the writes
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        pid = run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "spacetimedb")[-1]["pid"]
        _write_items(env, 1000)
        os.kill(pid, signal.SIGTERM)
        run.wait_event("child.exited", child="spacetimedb", timeout=30)
        run.wait_event("child.ready", child="spacetimedb", timeout=60)
        wait_for(lambda: len(run.find(lambda e: e.get("event") == "child.ready"
                                      and e.get("child") == "spacetimedb")) >= 2, 60, "restarted")
        assert len(sql(env, "SELECT * FROM Items")) < 1000
        run.stop()


@pytest.mark.pid1
def test_module_log_line_reaches_our_stdout(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    with Running(env, pid1=True) as run:
        run.wait_event("module_logs.following", timeout=60)
        resp = httpx.post(f"{stdb_url(env)}/v1/database/pogly/call/log_message", json=["Warn", "hello from pogly"],
                          headers={"Authorization": f"Bearer {token(env)}"})
        assert resp.status_code == 200
        line = run.wait_event("hello from pogly", timeout=30)
        assert line["service"] == "module:pogly" and line["level"] == "warning"
        run.stop()


@pytest.mark.pid1
@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
def test_database_owned_by_another_identity_exits_78(tmp_path: Path, version: str) -> None:
    env = base_env(tmp_path, STANDIN_VERSION=version)
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    # The config volume is lost (a new PVC): a new identity, same data.
    config = Path(env["POGLY_CONFIG_DIR"])
    for name in ("cli.toml", "pogly-entrypoint.json"):
        (config / name).unlink()
    before = tree_digest(Path(env["POGLY_DATA_DIR"]))
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "publish.not_owner")[0]
    assert tree_digest(Path(env["POGLY_DATA_DIR"])) == before
    assert "clear" in fatal["message"] or "delete" in fatal["message"]
