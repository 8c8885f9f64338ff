"""``backup`` and ``restore`` through the whole program: the entrypoint, the SpacetimeDB stand-in, real Caddy.

The stand-in syncs its commit log every 500 ms and at SIGINT, like the real
server; these runs raise the interval to 5 s, so a write acknowledged just
before the backup is on disk only if the pause really stopped SpacetimeDB
the graceful way.  While a backup holds the pause, the archive it streams to
stdout waits in a pipe the test has not read yet (a 1 MiB incompressible file
on the data volume makes the archive larger than a pipe's buffer), so the
test looks at ``/readyz`` and the web app during the pause without racing it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import stat
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoint.control import ControlClient
from entrypoint.version import __version__
from tests.harness import ENTRYPOINT, REPO, Running, base_env, wait_for

BALLAST = 1 << 20


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = base_env(root, OIDC_ISSUER="", OIDC_CLIENT_ID="", STANDIN_FLUSH_INTERVAL_MS="5000", **extra)
    (Path(env["POGLY_DATA_DIR"]) / "ballast.bin").write_bytes(os.urandom(BALLAST))
    return env


def command(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(ENTRYPOINT + list(args), env=env, capture_output=True, cwd=REPO, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_backup_to_pipe(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``backup --to -`` into a pipe nobody reads yet: it blocks on the pipe while SpacetimeDB is paused."""
    return subprocess.Popen([*ENTRYPOINT, "backup", "--to", "-"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO)


def token(env: dict[str, str]) -> str:
    return tomllib.loads((Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())["spacetimedb_token"]


def api(env: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=f"http://{env['POGLY_SPACETIME_ADDR']}", timeout=30,
                        headers={"Authorization": f"Bearer {token(env)}"})


def write_items(env: dict[str, str], values: list[str]) -> None:
    """Each one acknowledged: the server answered 200 to the reducer call."""
    with api(env) as client:
        for value in values:
            resp = client.post("/v1/database/pogly/call/insert_item", json=[value])
            assert resp.status_code == 200, resp.text


def items(env: dict[str, str]) -> list[str]:
    with api(env) as client:
        resp = client.post("/v1/database/pogly/sql", content="SELECT * FROM Items")
        assert resp.status_code == 200, resp.text
        return sorted(str(row[1]) for row in resp.json()[0]["rows"])


def readyz(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    resp = httpx.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}/readyz", timeout=5)
    return resp.status_code, resp.json()


def status(env: dict[str, str]) -> dict[str, Any]:
    return httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()


def paused_for_backup(env: dict[str, str]) -> bool:
    code, body = readyz(env)
    return code == 503 and "spacetimedb: paused for backup" in body.get("not_ready", [])


def ready(env: dict[str, str]) -> bool:
    try:
        return readyz(env)[0] == 200
    except httpx.HTTPError:
        return False


def test_backup_pauses_briefly_and_restore_brings_back_every_acknowledged_write(tmp_path: Path) -> None:
    env = env_for(tmp_path / "site")
    archive = tmp_path / "pogly.tar.gz"
    before = [f"before-{i}" for i in range(200)]
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=120)
        write_items(env, before)  # acknowledged, still in the stand-in's 5 s sync window
        identity_before = status(env)
        backup = start_backup_to_pipe(env)
        try:
            wait_for(lambda: paused_for_backup(env), 60, "/readyz 503: spacetimedb paused for backup")
            web = httpx.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}/", timeout=5)
            assert web.status_code == 200 and "pogly placeholder" in web.text  # Caddy keeps serving the app
            refused = command(env, "restore", str(archive))  # a serving container is never restored into
            assert refused.returncode == 75, refused.stderr
            assert b"flux suspend" in refused.stderr and b"docker run --rm" in refused.stderr
            data, err = backup.communicate(timeout=120)
        finally:
            backup.kill()
        assert backup.returncode == 0, err.decode()
        archive.write_bytes(data)
        wait_for(lambda: ready(env), 60, "/readyz 200 again")
        write_items(env, ["after-backup"])  # not in the archive
        assert run.find(lambda e: e.get("event") == "child.exited" and e.get("child") == "spacetimedb") == []
        done = run.wait_event("backup.done", timeout=30)  # in the container log, from the exec'd process
        assert done["ready_again"] is True
        assert [e["why"] for e in run.find(lambda e: e.get("event") == "control.lease_released")] == ["resume"]
        run.stop()

    with tarfile.open(archive) as tar:
        first = tar.next()
        assert first is not None and first.name == "manifest.json"
        manifest = json.load(tar.extractfile(first))  # type: ignore[arg-type]
    assert manifest["pogly_entrypoint_version"] == __version__ and manifest["spacetimedb_version"] == "1.7.0"
    assert manifest["publisher_identity"] == identity_before["publisher_identity"]
    assert manifest["modules"]["pogly"]["database_identity"] == identity_before["modules"]["pogly"]["database_identity"]
    assert {f["path"] for f in manifest["files"]} >= {"config/id_ecdsa", "config/cli.toml", "data/ballast.bin"}

    fresh = base_env(tmp_path / "restored", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    restored = command(fresh, "restore", str(archive))
    assert restored.returncode == 0, restored.stderr.decode()
    config = Path(fresh["POGLY_CONFIG_DIR"])
    for key in ("id_ecdsa", "id_ecdsa.pub", "cli.toml"):
        assert stat.S_IMODE((config / key).stat().st_mode) == 0o600
    with Running(fresh) as run:
        run.wait_event("entrypoint.ready", timeout=120)
        assert run.find(lambda e: e.get("event") == "publish.unchanged" and e.get("module") == "pogly")
        assert not run.find(lambda e: e.get("event") in ("publish.created", "identity.created"))
        after = status(fresh)
        assert after["publisher_identity"] == identity_before["publisher_identity"]
        assert after["modules"]["pogly"]["database_identity"] == \
            identity_before["modules"]["pogly"]["database_identity"]
        assert after["modules"]["pogly"]["publish_result"] == "unchanged"
        assert items(fresh) == sorted(before)  # every acknowledged write, and nothing from after the backup
        run.stop()


def test_a_killed_backup_lets_spacetimedb_start_again(tmp_path: Path) -> None:
    env = env_for(tmp_path / "site")
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=120)
        backup = start_backup_to_pipe(env)
        try:
            wait_for(lambda: paused_for_backup(env), 60, "/readyz 503: spacetimedb paused for backup")
        finally:
            backup.send_signal(signal.SIGKILL)
            backup.wait(30)
        wait_for(lambda: ready(env), 60, "/readyz 200 after the backup was killed")
        released = run.wait_event("control.lease_released", timeout=30)
        assert released["why"] == "connection closed"
        assert run.find(lambda e: e.get("event") == "child.exited" and e.get("child") == "spacetimedb") == []
        assert status(env)["children"]["spacetimedb"]["restarts"] == 0
        run.stop()


def test_a_stop_during_the_pause_stops_everything_and_the_copy_stays_whole(tmp_path: Path) -> None:
    env = env_for(tmp_path / "site")
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=120)
        backup = start_backup_to_pipe(env)
        try:
            wait_for(lambda: paused_for_backup(env), 60, "/readyz 503: spacetimedb paused for backup")
            run.stop()  # SIGTERM while SpacetimeDB is paused: exit 0, nothing started again
            data, err = backup.communicate(timeout=120)
        finally:
            backup.kill()
    started = run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "spacetimedb")
    assert len(started) == 1
    assert backup.returncode == 0, err.decode()  # SpacetimeDB stayed stopped for the whole copy
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert "data/ballast.bin" in tar.getnames()


def test_a_failed_backup_never_clobbers_an_existing_archive(tmp_path: Path) -> None:
    env = env_for(tmp_path / "site")
    target = tmp_path / "pogly.tar.gz"
    target.write_bytes(b"yesterday's backup")
    no_supervisor = command(env, "backup", "--to", str(target))
    assert no_supervisor.returncode == 69 and b"--offline" in no_supervisor.stderr
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=120)
        with ControlClient.connect(Path(env["POGLY_RUN_DIR"])) as holder:  # another backup holds the pause
            holder.request("pause", service="spacetimedb", reason="backup")
            busy = command(env, "backup", "--to", str(target))
        assert busy.returncode == 75, busy.stderr
        assert b"already paused" in busy.stderr
        assert target.read_bytes() == b"yesterday's backup"
        assert not target.with_name(target.name + ".partial").exists()
        wait_for(lambda: ready(env), 60, "ready again once the holder let go")
        good = command(env, "backup", "--to", str(target))
        assert good.returncode == 0, good.stderr
        assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds the signing key and the publisher token
        assert target.read_bytes()[:2] == b"\x1f\x8b"
        run.stop()


# --------------------------------------------------------------------------- restore refuses


def offline_archive(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A small archive of two volumes, taken offline (no supervisor runs)."""
    env = base_env(tmp_path / "src", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    (Path(env["POGLY_DATA_DIR"]) / "replicas").mkdir()
    (Path(env["POGLY_DATA_DIR"]) / "replicas" / "log").write_text("commit 1\n")
    (Path(env["POGLY_CONFIG_DIR"]) / "id_ecdsa").write_text("private key\n")
    archive = tmp_path / "offline.tar.gz"
    made = command(env, "backup", "--offline", "--to", str(archive))
    assert made.returncode == 0, made.stderr
    return env, archive


def rewrite(archive: Path, dest: Path, change: Any) -> Path:
    """Copy ``archive`` member by member; ``change(name, info, data)`` returns the members to write instead."""
    out = io.BytesIO()
    with tarfile.open(archive) as src, tarfile.open(fileobj=out, mode="w") as tar:
        for member in src:
            data = src.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
            for info, content in change(member.name, member, data):
                info.size = len(content) if info.isreg() else 0
                tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    dest.write_bytes(gzip.compress(out.getvalue()))
    return dest


def restore_into(tmp_path: Path, archive: Path) -> tuple[subprocess.CompletedProcess[bytes], dict[str, str]]:
    target = base_env(tmp_path / "target", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    (Path(target["POGLY_DATA_DIR"]) / "keep.me").write_text("current data")
    return command(target, "restore", str(archive)), target


def untouched(target: dict[str, str]) -> bool:
    data = Path(target["POGLY_DATA_DIR"])
    return sorted(p.name for p in data.iterdir()) == ["keep.me"] and (data / "keep.me").read_text() == "current data"


def test_restore_keeps_the_previous_contents_aside(tmp_path: Path) -> None:
    _, archive = offline_archive(tmp_path)
    done, target = restore_into(tmp_path, archive)
    assert done.returncode == 0, done.stderr
    data = Path(target["POGLY_DATA_DIR"])
    assert (data / "replicas" / "log").read_text() == "commit 1\n"
    [aside] = [p for p in data.iterdir() if p.name.startswith(".pogly-pre-restore-")]
    assert (aside / "keep.me").read_text() == "current data"
    assert str(aside) in done.stdout.decode()
    assert stat.S_IMODE((Path(target["POGLY_CONFIG_DIR"]) / "id_ecdsa").stat().st_mode) == 0o600


def test_restore_refuses_a_tampered_archive_before_touching_anything(tmp_path: Path) -> None:
    _, archive = offline_archive(tmp_path)

    def flip(name: str, info: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        return [(info, b"commit 2\n" if name == "data/replicas/log" else data)]

    done, target = restore_into(tmp_path, rewrite(archive, tmp_path / "tampered.tar.gz", flip))
    assert done.returncode == 65
    assert b"data/replicas/log does not match the manifest" in done.stderr
    assert untouched(target)


def test_restore_refuses_another_major_version_naming_both(tmp_path: Path) -> None:
    _, archive = offline_archive(tmp_path)
    theirs = f"{int(__version__.split('.')[0]) + 1}.0.0"

    def bump(name: str, info: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if name == "manifest.json":
            data = json.dumps({**json.loads(data), "pogly_entrypoint_version": theirs}).encode()
        return [(info, data)]

    done, target = restore_into(tmp_path, rewrite(archive, tmp_path / "future.tar.gz", bump))
    assert done.returncode == 65
    message = done.stderr.decode()
    assert f"pogly-entrypoint {theirs}" in message and f"pogly-entrypoint {__version__}" in message
    assert untouched(target)


@pytest.mark.parametrize("evil", ["data/../../escaped", "/etc/escaped", "config/link"])
def test_restore_refuses_members_that_could_land_outside(tmp_path: Path, evil: str) -> None:
    _, archive = offline_archive(tmp_path)

    def smuggle(name: str, info: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if name != "manifest.json":
            return [(info, data)]
        document = json.loads(data)
        bad = tarfile.TarInfo(evil)
        if evil.endswith("link"):
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            document["files"].append({"path": evil, "size": 4, "sha256": "0" * 64})
        return [(info, json.dumps(document).encode()), (bad, b"evil")]

    done, target = restore_into(tmp_path, rewrite(archive, tmp_path / "evil.tar.gz", smuggle))
    assert done.returncode == 65, done.stderr
    assert untouched(target)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "target" / "escaped").exists()


def test_an_ext4_lost_and_found_is_neither_archived_nor_moved(tmp_path: Path) -> None:
    env = base_env(tmp_path / "src", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    (Path(env["POGLY_DATA_DIR"]) / "lost+found").mkdir()
    (Path(env["POGLY_DATA_DIR"]) / "lost+found" / "#1234").write_text("fsck's find")
    (Path(env["POGLY_DATA_DIR"]) / "metadata.toml").write_text("version = 1\n")
    archive = tmp_path / "offline.tar.gz"
    made = command(env, "backup", "--offline", "--to", str(archive))
    assert made.returncode == 0, made.stderr
    with tarfile.open(archive) as tar:
        assert not [n for n in tar.getnames() if "lost+found" in n]
    target = base_env(tmp_path / "target", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    (Path(target["POGLY_DATA_DIR"]) / "lost+found").mkdir()
    done = command(target, "restore", "--discard-old", str(archive))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in Path(target["POGLY_DATA_DIR"]).iterdir()) == ["lost+found", "metadata.toml"]
