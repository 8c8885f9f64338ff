"""Adversarial tests for the OIDC verdict memo (issue 15): what a restart trusts from an earlier boot.

The memo (``<POGLY_CONFIG_DIR>/oidc-verified.json``) lets readiness go on
without waiting for the provider check when exactly these settings were
verified before.  These tests feed it what a volume can hold (a symlink to
elsewhere, a FIFO, another version's record, a world-readable leftover), and
check what happens when the provider turns wrong after the container is Ready
or while the low-priority helper still runs at a stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from entrypoint import config
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE
from entrypoint.oidc import memo, verdict
from entrypoint.supervision.process import Reaper
from entrypoint.supervision.status import Status
from tests.harness import Running, base_env, cmdline, free_port, wait_for
from tests.oidc.fixtures import node_provider
from tests.test_pid1 import namespace_procs

ISSUER = "https://id.example.com/realms/pogly"


def _settings(tmp: Path, **overrides: str) -> config.Settings:
    settings = config.load(base_env(tmp, OIDC_ISSUER=ISSUER, **overrides))
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    return settings


# -- the file on the volume ---------------------------------------------------------------------------------------


def test_remembering_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("someone else's file\n")
    memo.memo_path(settings).symlink_to(elsewhere)
    assert memo.remember(settings) is None
    assert elsewhere.read_text() == "someone else's file\n"
    path = memo.memo_path(settings)
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert memo.remembered(settings)


def test_forgetting_removes_a_symlink_not_what_it_points_to(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep me\n")
    memo.memo_path(settings).symlink_to(elsewhere)
    memo.forget(settings)
    assert not memo.memo_path(settings).is_symlink() and elsewhere.read_text() == "keep me\n"


def test_a_leftover_world_readable_memo_is_rewritten_0600(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    path = memo.memo_path(settings)
    path.write_text("{}")
    path.chmod(0o644)
    assert memo.remember(settings) is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_memo_holds_neither_the_client_id_nor_any_other_setting_in_clear(tmp_path: Path) -> None:
    client = "client-id-7f3a9c-distinctive"
    settings = _settings(tmp_path, OIDC_CLIENT_ID=client, POGLY_PUBLIC_URL="https://overlay-distinctive.example.com")
    assert memo.remember(settings) is None
    text = memo.memo_path(settings).read_text()
    assert client not in text and "overlay-distinctive" not in text
    assert set(json.loads(text)) == {"memo_version", "fingerprint", "issuer", "verified_at"}


@pytest.mark.parametrize("content", [
    "null", "[]", '"verified"', "{}", '{"memo_version": 1}', '{"memo_version": 2, "fingerprint": "%s"}',
    '{"memo_version": "1", "fingerprint": "%s"}', '{"memo_version": 1, "fingerprint": ["%s"]}',
])
def test_a_memo_that_is_not_exactly_ours_is_not_trusted(tmp_path: Path, content: str) -> None:
    settings = _settings(tmp_path)
    memo.memo_path(settings).write_text(content.replace("%s", memo.fingerprint(settings)))
    assert not memo.remembered(settings)


def test_undecodable_bytes_are_not_trusted(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    memo.memo_path(settings).write_bytes(b'{"memo_version": 1, "fingerprint": "\xff\xfe"}')
    assert not memo.remembered(settings)


def test_a_deeply_nested_memo_is_not_trusted_and_does_not_crash_the_start(tmp_path: Path) -> None:
    """``json.loads`` raises ``RecursionError`` (not a ``ValueError``) on deep nesting; ``remembered`` runs in
    ``helper.prespawn`` before the event loop, so an uncaught one ends PID 1 with exit 1 and a bare traceback
    on stderr, before a single log line (seen with the real program)."""
    settings = _settings(tmp_path)
    memo.memo_path(settings).write_text("[" * 100_000)
    assert not memo.remembered(settings)


def test_another_versions_memo_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    monkeypatch.setattr(memo, "__version__", "0.0.1-older")
    assert memo.remember(settings) is None
    monkeypatch.undo()
    assert not memo.remembered(settings)


def test_a_memo_that_is_not_a_regular_file_never_blocks_the_start(tmp_path: Path) -> None:
    """``remembered`` runs in PID 1 before the event loop (``helper.prespawn``): it must not block there.

    A FIFO (or a symlink to one, or to a device) on the config volume is
    opened and read like a file: a FIFO's ``open`` waits for a writer that
    never comes, so PID 1 would hang before its event loop, neither ready
    nor stoppable.  Whatever is not a regular file is "not remembered".
    """
    settings = _settings(tmp_path)
    path = memo.memo_path(settings)
    os.mkfifo(path)
    answer: list[bool] = []
    reader = threading.Thread(target=lambda: answer.append(memo.remembered(settings)), daemon=True)
    reader.start()
    reader.join(5.0)
    hung = reader.is_alive()
    if hung:  # release the reader: a writer opens and closes the FIFO, so its read ends with EOF
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(5.0)
    assert not hung, "memo.remembered blocked on a FIFO at the memo path"
    assert answer == [False]


# -- settle: the answers that come after ready -------------------------------------------------------------------


def _settle_with_answers(settings: config.Settings, answers: list[tuple[int, dict[str, Any]]],
                         monkeypatch: pytest.MonkeyPatch) -> tuple[Status, BaseException | None, list[bool]]:
    """Run ``verdict.settle`` with the helper's answers scripted; what ``checked`` was at each helper call."""
    status = Status()
    checked_at_call: list[bool] = []

    async def main() -> BaseException | None:
        checked = asyncio.Event()
        remaining = list(answers)

        async def ask(*_: Any, **__: Any) -> tuple[int, dict[str, Any]]:
            checked_at_call.append(checked.is_set())
            return remaining.pop(0)

        async def no_pause(_: float) -> None:
            if not remaining:
                raise asyncio.CancelledError  # the scripted answers are used up: end the re-check loop here

        monkeypatch.setattr(verdict, "ask_helper", ask)
        try:
            await verdict.settle(settings, status, Reaper(), checked, sleep=no_pause)
        except asyncio.CancelledError:
            return None
        except BaseException as exc:  # the Fatal is what is looked at
            return exc
        return None

    return status, asyncio.run(main()), checked_at_call


def test_a_wrong_answer_in_the_background_recheck_forgets_the_memo_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable at the first check (serving unverified), then the provider answers wrongly (78).

    The run keeps serving (by design), but the memo must not keep saying these
    settings are verified: otherwise the next restart is Ready at once (``oidc:
    rechecking``) and only then exits 78, where without the memo it would have
    exited 78 before ever being Ready.
    """
    settings = _settings(tmp_path)
    assert memo.remember(settings) is None
    status, error, _ = _settle_with_answers(
        settings, [(EXIT_UNAVAILABLE, {"message": "unreachable"}), (EXIT_CONFIG, {"message": "issuer mismatch"})],
        monkeypatch)
    assert error is None and status.oidc == "unverified"
    assert not memo.memo_path(settings).exists(), "a 78 from the re-check left the memo saying 'verified'"


# -- the real program ---------------------------------------------------------------------------------------------


def _child_stopped(run: Running) -> dict[str, dict[str, Any]]:
    return {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}


@pytest.mark.pid1
def test_a_provider_turning_wrong_after_ready_exits_78_with_both_children_stopped_cleanly(tmp_path: Path) -> None:
    # The provider is down at the restart (ready at once with "rechecking"); it then comes back answering
    # with a trailing-slash issuer the settings do not have: the re-check says 78 after the container was Ready.
    port = free_port()
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/application/o/pogly", OIDC_DISCOVERY_TIMEOUT="60")
    settings = config.load(env)
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    assert memo.remember(settings) is None  # as if an earlier boot had verified these settings
    with Running(env, pid1=True) as run:
        assert run.wait_event("entrypoint.ready", timeout=60)["oidc"] == "rechecking"
        with node_provider("--shape", "authentik", "--port", str(port)):
            assert run.wait(60) == EXIT_CONFIG
    events = [e.get("event") for e in run.events]
    assert events.index("entrypoint.ready") < events.index("oidc.invalid")
    [fatal] = run.find(lambda e: e.get("event") == "oidc.invalid")
    assert "trailing slash" in fatal["message"] and "verified at an earlier boot" in fatal["message"]
    stopped = _child_stopped(run)
    assert set(stopped) == {"caddy", "spacetimedb"}
    assert not stopped["caddy"]["killed"] and not stopped["spacetimedb"]["killed"]
    assert stopped["spacetimedb"]["exit"] == "exit code 0"  # SIGINT: flushed, not killed
    assert run.find(lambda e: e.get("event") == "entrypoint.straggler_killed") == []
    assert not memo.memo_path(settings).exists()


@pytest.mark.pid1
def test_a_stop_while_the_low_priority_recheck_still_runs_leaves_no_straggler(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the helper keeps retrying for up to 60 s
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/realms/pogly", OIDC_DISCOVERY_TIMEOUT="60")
    settings = config.load(env)
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    assert memo.remember(settings) is None
    with Running(env, pid1=True) as run:
        assert run.wait_event("entrypoint.ready", timeout=60)["oidc"] == "rechecking"
        wait_for(lambda: [p for p in namespace_procs(run.inner_pid) if "oidc-check" in cmdline(p.pid)],
                 10, "the oidc-check helper, still running when the stop comes")
        run.stop()  # exit 0
    assert run.find(lambda e: e.get("event") == "entrypoint.straggler_killed") == []
    assert memo.memo_path(settings).exists()  # a stop is no verdict about the provider
    assert list(settings.run_dir.glob(".oidc-check-*.json")) == []  # the helper's settings file is gone too
