"""Clear errors for full disks and empty modules (issue 13, fault 6).

A full run dir used to end in exit 70 ``OSError(28)`` (no file, no directory
named); a zero-byte ``.wasm`` was published.  The disk is a real tmpfs, filled
to its last page inside ``unshare --mount`` (root); the module is a real file.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from entrypoint.fsutil import WriteFailed, atomic_write
from tests.harness import ENTRYPOINT, Running, base_env

FULL_DIR = r"""
set -u
mount -t tmpfs -o size=64k pogly-full "$FULL_DIR"
dd if=/dev/zero of="$FULL_DIR/.filler" bs=4096 2>/dev/null
exec "$@"
"""


def test_full_run_dir_exits_78_naming_the_directory(tmp_path: Path) -> None:
    # OIDC off: with it on, the oidc-check helper's settings file is the first write into the run
    # dir (oidc/verdict.py, being restructured under issue 11) and still fails with exit 70.
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    run_dir = Path(env["POGLY_RUN_DIR"])
    run_dir.mkdir()
    env["FULL_DIR"] = str(run_dir)
    with Running(env, command=["unshare", "--mount", "sh", "-c", FULL_DIR, "sh", *ENTRYPOINT]) as run:
        assert run.wait() == 78, "\n".join(run.raw[-20:] + run.stderr[-20:])
    failed = run.find(lambda e: e.get("event") == "config.dir_unwritable")
    assert failed, "\n".join(run.raw[-20:])
    assert failed[0]["variable"] == "POGLY_RUN_DIR" and failed[0]["errno"] == "ENOSPC"
    assert failed[0]["path"] == str(run_dir / "config.js")
    assert f"POGLY_RUN_DIR={run_dir}" in failed[0]["message"] and "full" in failed[0]["message"]
    assert not run.find(lambda e: e.get("event") == "entrypoint.internal_error")
    assert "Traceback" not in "\n".join(run.stderr)


def test_empty_wasm_is_refused_naming_the_file(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    wasm = Path(env["POGLY_MODULE_DIR"]) / "pogly.wasm"
    wasm.write_bytes(b"")
    with Running(env) as run:
        assert run.wait() == 78, "\n".join(run.raw[-20:])
    refused = run.find(lambda e: e.get("event") == "publish.module_invalid")
    assert refused and refused[0]["path"] == str(wasm) and refused[0]["size"] == 0
    assert "empty" in refused[0]["message"] and str(wasm) in refused[0]["message"]
    assert not run.find(lambda e: e.get("event") in ("publish.created", "publish.start"))


def test_a_file_that_is_not_webassembly_is_refused(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    wasm = Path(env["POGLY_MODULE_DIR"]) / "pogly.wasm"
    wasm.write_bytes(b"<!doctype html>\n<title>404</title>")  # a download that went wrong
    with Running(env) as run:
        assert run.wait() == 78, "\n".join(run.raw[-20:])
    refused = run.find(lambda e: e.get("event") == "publish.module_invalid")
    assert refused and "not a WebAssembly module" in refused[0]["message"]


WRITE_ON_A_FULL_VOLUME = r"""
set -u
mount -t tmpfs -o size=64k pogly-full "$FULL_DIR"
printf 'spacetimedb_token = "old-token"\n' > "$FULL_DIR/cli.toml"
dd if=/dev/zero of="$FULL_DIR/.filler" bs=4096 2>/dev/null
"$@"
echo "rc=$?"
echo "content=$(cat "$FULL_DIR/cli.toml")"
echo "debris=$(ls -A "$FULL_DIR" | grep -c '\.tmp$')"
"""

ATOMIC_WRITE = """
import sys
from pathlib import Path
from entrypoint.fsutil import WriteFailed, atomic_write
try:
    atomic_write(Path(sys.argv[1]) / "cli.toml", 'spacetimedb_token = "new-token"\\n', 0o600)
except WriteFailed as exc:
    print("error=" + str(exc))
    sys.exit(exc.exit_code)
"""


def test_full_volume_while_writing_the_token_keeps_the_old_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.harness import REPO

    volume = tmp_path / "config"
    volume.mkdir()
    done = subprocess.run(["unshare", "--mount", "sh", "-c", WRITE_ON_A_FULL_VOLUME, "sh",
                           sys.executable, "-c", ATOMIC_WRITE, str(volume)],
                          env={"FULL_DIR": str(volume), "PATH": "/usr/bin:/bin"}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert out.get("rc") == "78", done.stdout + done.stderr
    assert out["error"] == f"cannot write {volume / 'cli.toml'}: No space left on device (ENOSPC)"
    assert out["content"] == 'spacetimedb_token = "old-token"'
    assert out["debris"] == "0"


def test_write_failed_is_an_oserror_and_an_exit_78() -> None:
    exc = WriteFailed(Path("/run/pogly/config.js"), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC and exc.filename == "/run/pogly/config.js"
    assert exc.exit_code == 78 and exc.event == "config.dir_unwritable"
    assert "cannot write /run/pogly/config.js: No space left on device (ENOSPC)" in exc.message
    fatal = exc.fatal("POGLY_RUN_DIR", Path("/run/pogly"))
    assert fatal.message.startswith("POGLY_RUN_DIR=/run/pogly is not writable: cannot write /run/pogly/config.js")
    assert fatal.fields["variable"] == "POGLY_RUN_DIR"
    with pytest.raises(WriteFailed):
        atomic_write(Path("/proc/pogly-cannot-write-here/x"), "data")
