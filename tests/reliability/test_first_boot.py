"""Onboarding stays closed whatever happens to the state file (issue 13, fault 3).

The first-boot Config (STREAM_*, DEBUG_MODE, STRICT_MODE, ``ConfigInit =
true``) used to be applied only when the state file said "we created this
database".  A state write that failed right after ``publish.created`` (a full
config volume, a crash in that window) left ``ConfigInit`` false for good, and
whoever called Pogly's ``SetConfig`` first became the owner.  Now the database
decides.  Real processes throughout: the entrypoint, the stand-in, real Caddy,
and a real full tmpfs for the config volume (``unshare --mount``, root).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import httpx

from entrypoint.spacetimedb.credentials import token_identity
from tests import stdbhelp
from tests.harness import ENTRYPOINT, FIXTURE_WASM, Running, base_env

STREAM_NAME = "reliability_first_boot"

# Mount a tmpfs over POGLY_CONFIG_DIR holding what the directory held, fill it to the last page,
# run the entrypoint, then copy back what it wrote (a bind mount of the real directory stays
# reachable under the tmpfs).  Everything dies with the mount namespace.
FULL_CONFIG_VOLUME = r"""
set -u
under=$(mktemp -d)
mount --bind "$POGLY_CONFIG_DIR" "$under"
mount -t tmpfs -o size=256k,mode=0700 pogly-full "$POGLY_CONFIG_DIR"
cp -a "$under"/. "$POGLY_CONFIG_DIR"/
dd if=/dev/zero of="$POGLY_CONFIG_DIR/.filler" bs=4096 2>/dev/null
"$@"
rc=$?
rm -f "$POGLY_CONFIG_DIR/.filler"
cp -a "$POGLY_CONFIG_DIR"/. "$under"/
exit $rc
"""


def _make_identity(tmp: Path) -> tuple[dict[str, str], str]:
    """A first run on a throwaway data volume: the config volume gets its identity (cli.toml, keys).

    Returns the environment for the runs that follow (same ports, so ``cli.toml`` needs no rewrite)
    and the publisher's token.
    """
    (tmp / "throwaway").mkdir(mode=0o700)
    env = base_env(tmp, STREAM_NAME=STREAM_NAME, POGLY_DATA_DIR=str(tmp / "throwaway"))
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    (tmp / "config" / "pogly-entrypoint.json").unlink()  # that database's state, not the next one's
    return {**env, "POGLY_DATA_DIR": str(tmp / "stdb")}, _token(tmp)


def _token(tmp: Path) -> str:
    return str(tomllib.loads((tmp / "config" / "cli.toml").read_text())["spacetimedb_token"])


def _config_row(env: dict[str, str], token: str) -> dict[str, Any]:
    response = httpx.post(f"http://{env['POGLY_SPACETIME_ADDR']}/v1/database/pogly/sql",
                          content="SELECT * FROM Config WHERE Version = 0",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10, trust_env=False)
    response.raise_for_status()
    result = response.json()[0]
    names = [e["name"]["some"] for e in result["schema"]["elements"]]
    row = dict(zip(names, result["rows"][0], strict=True))
    owner = row["OwnerIdentity"]
    row["OwnerIdentity"] = (owner[0] if isinstance(owner, list) else owner).removeprefix("0x").lower()
    return row


def _stranger_cannot_take_ownership(env: dict[str, str], publisher: str) -> None:
    """A new anonymous identity, on the public port, calls SetConfig: refused, the owner is unchanged."""
    public = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
    with httpx.Client(base_url=public, timeout=10, trust_env=False) as client:
        stranger = client.post("/v1/identity").json()
        call = client.post("/v1/database/pogly/call/SetConfig",
                           content=json.dumps(["twitch", "stolen", False, 120, 200, False, False, ""]),
                           headers={"Authorization": f"Bearer {stranger['token']}",
                                    "Content-Type": "application/json"})
    assert call.status_code == 530 and "already initialized" in call.text, (call.status_code, call.text)
    row = _config_row(env, _token_of(env))
    assert row["OwnerIdentity"] != stranger["identity"].lower()
    assert row["OwnerIdentity"] == publisher
    assert row["StreamName"] == STREAM_NAME and row["ConfigInit"] is True


def _token_of(env: dict[str, str]) -> str:
    return str(tomllib.loads((Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())["spacetimedb_token"])


def test_state_write_lost_to_a_full_config_volume_leaves_onboarding_closed(tmp_path: Path) -> None:
    env, token = _make_identity(tmp_path)
    publisher = token_identity(token)
    wrapper = ["unshare", "--mount", "sh", "-c", FULL_CONFIG_VOLUME, "sh", *ENTRYPOINT]
    with Running(env, command=wrapper) as run:
        assert run.wait() == 78, "\n".join(run.raw[-20:] + run.stderr[-20:])
    created = run.find(lambda e: e.get("event") == "publish.created")
    applied = run.find(lambda e: e.get("event") == "config.first_boot_applied")
    failed = run.find(lambda e: e.get("event") == "config.dir_unwritable")
    assert created and applied and failed, "\n".join(run.raw[-20:])
    assert failed[0]["variable"] == "POGLY_CONFIG_DIR" and failed[0]["errno"] == "ENOSPC"
    assert str(tmp_path / "config") in failed[0]["message"]
    assert "pogly-entrypoint.json" in failed[0]["message"] and "full" in failed[0]["message"]
    assert not (tmp_path / "config" / "pogly-entrypoint.json").exists()  # the write really was lost
    assert not list((tmp_path / "config").glob(".pogly-entrypoint.json.*.tmp"))  # and left no debris

    with Running(env) as run:  # the next start, with space again
        run.wait_event("entrypoint.ready", timeout=60)
        assert run.find(lambda e: e.get("event") == "publish.updated")
        _stranger_cannot_take_ownership(env, publisher)
        run.stop()


def test_database_created_without_its_first_boot_config_is_repaired_at_the_next_start(tmp_path: Path) -> None:
    """Created, then the process died before the Config row and the state file were written."""
    env, token = _make_identity(tmp_path)
    publisher = token_identity(token)
    with stdbhelp.StandIn(tmp_path / "stdb", tmp_path / "config") as server:
        put = httpx.put(f"{server.addr.url}/v1/database/pogly", params={"host_type": "Wasm"},
                        content=FIXTURE_WASM.read_bytes(), timeout=30, trust_env=False,
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/wasm"})
        assert put.status_code == 200 and put.json()["Success"]["op"] == "created"
    shutil.copy(FIXTURE_WASM, tmp_path / "modules" / "pogly.wasm")

    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        repaired = run.find(lambda e: e.get("event") == "config.first_boot_applied")
        assert repaired and repaired[0]["repaired"] is True and repaired[0]["level"] == "warning"
        _stranger_cannot_take_ownership(env, publisher)
        run.stop()
