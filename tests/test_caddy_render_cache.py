"""A restart reuses the rendered Caddyfile when nothing that renders it changed, and never loads jinja2 then.

Issue 15: PID 1 lives as long as the container, and importing jinja2 (+ markupsafe)
only to re-render the same Caddyfile costs ~1.8 MB of its RSS for good and
~40 ms of CPU while SpacetimeDB starts.  The real program is run (the
SpacetimeDB stand-in, real Caddy) and its restarts are watched: the
``caddy.render_reused`` event, the file on disk, what Caddy serves, and
``python -X importtime``'s list of what the process imported.  Anything that
feeds the template (a setting, the template itself) or a damaged file means a
fresh render.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoint import config
from entrypoint.web import caddy
from tests import caddyhelp as ch
from tests.harness import REPO, Running, base_env, free_port

IMPORTTIME = [sys.executable, "-X", "importtime", "-m", "entrypoint"]


def _env(tmp: Path, **overrides: str) -> dict[str, str]:
    # OIDC off: nothing here is about the provider, and no oidc-check helper is spawned.
    return base_env(tmp, OIDC_ISSUER="", OIDC_CLIENT_ID="", **overrides)


@contextmanager
def _ready(env: dict[str, str], command: list[str] | None = None) -> Iterator[Running]:
    """The real program, up to ``entrypoint.ready``; stopped with SIGTERM (exit 0) when the block ends."""
    with Running(env, command=command) as run:
        run.wait_event("entrypoint.ready", 60)
        yield run
        run.stop()


def _reused(run: Running) -> int:
    return len(run.find(lambda e: e.get("event") == "caddy.render_reused"))


def _imported(run: Running, package: str) -> list[str]:
    """``-X importtime`` lines (stderr) naming ``package`` or one of its submodules."""
    return [line for line in run.stderr if line.startswith("import time:")
            and line.rsplit("|", 1)[-1].strip().split(".")[0] == package]


def _serves(env: dict[str, str], path: str = "/") -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}{path}")


def _caddyfile(env: dict[str, str]) -> Path:
    return Path(env["POGLY_RUN_DIR"]) / caddy.CADDYFILE_NAME


# -- the real program ----------------------------------------------------------------------------


def test_restart_reuses_the_caddyfile_and_never_imports_jinja2(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with _ready(env, IMPORTTIME) as first:
        assert _reused(first) == 0
        assert _imported(first, "jinja2"), "the first boot renders: -X importtime must show jinja2 (else the check "\
            "below proves nothing)"
    path = _caddyfile(env)
    rendered, before = path.read_bytes(), path.stat()
    stamp = json.loads((path.parent / "Caddyfile.rendered").read_text())
    assert set(stamp) == {"render_key", "sha256", "version"}

    with _ready(env, IMPORTTIME) as second:
        assert _reused(second) == 1
        assert second.find(lambda e: e.get("event") == "caddy.validate_skipped")
        response = _serves(env)
        assert response.status_code == 200 and "pogly placeholder" in response.text
    # After its exit (stderr drained): not at start, not serving, not while stopping.
    assert _imported(second, "jinja2") == [] and _imported(second, "markupsafe") == []
    assert _imported(second, "entrypoint"), "-X importtime printed nothing: the check above would prove nothing"
    after = path.stat()
    assert path.read_bytes() == rendered
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not even rewritten


@pytest.mark.parametrize("variable", ["POGLY_PUBLIC_METRICS", "POGLY_HTTP_PORT"])
def test_a_setting_that_feeds_the_template_renders_again(tmp_path: Path, variable: str) -> None:
    env = _env(tmp_path)
    with _ready(env):
        pass
    old = _caddyfile(env).read_text()
    changed = dict(env, **{variable: "true" if variable == "POGLY_PUBLIC_METRICS" else str(free_port())})
    with _ready(changed) as run:
        assert _reused(run) == 0
        text = _caddyfile(env).read_text()
        assert text != old
        if variable == "POGLY_PUBLIC_METRICS":
            assert "\tlog_skip /metrics\n" in text
            assert _serves(changed, "/metrics").status_code == 200  # public now, not the 403 it was
        else:
            assert f":{changed['POGLY_HTTP_PORT']} {{" in text
        assert _serves(changed).status_code == 200
    with _ready(changed) as run:  # and the new file is the one reused next time
        assert _reused(run) == 1


@pytest.mark.parametrize("damage", ["truncated", "edited", "stamp-of-another-render"])
def test_a_damaged_caddyfile_or_stamp_is_rendered_again(tmp_path: Path, damage: str) -> None:
    env = _env(tmp_path)
    with _ready(env):
        pass
    path = _caddyfile(env)
    good = path.read_text()
    if damage == "truncated":
        path.write_text(good[: len(good) // 2])
    elif damage == "edited":
        path.write_text(good.replace("encode zstd gzip", "encode gzip"))
    else:  # what an upgrade that changed the template or the code leaves behind
        stamp = path.parent / "Caddyfile.rendered"
        record = json.loads(stamp.read_text())
        stamp.write_text(json.dumps(dict(record, render_key="0" * 64)))
    with _ready(env) as run:
        assert _reused(run) == 0
        assert path.read_text() == good
        assert _serves(env).status_code == 200


def test_a_changed_template_is_rendered_again(tmp_path: Path) -> None:
    """The program runs from a copy of the package whose Caddyfile.j2 the test edits, as an upgrade would."""
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "entrypoint", copy / "entrypoint", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(_env(tmp_path), PYTHONPATH=str(copy))
    command = [sys.executable, "-P", "-m", "entrypoint"]  # -P: the copy, not the checkout (the harness's cwd)
    with _ready(env, command) as run:
        assert run.find(lambda e: e.get("event") == "caddy.validate_skipped") == []
    with _ready(env, command) as run:
        assert _reused(run) == 1
    template = copy / "entrypoint" / "web" / "templates" / caddy.TEMPLATE_NAME
    marker = "# this line was added to the template after the first render"
    template.write_text(template.read_text().replace("\n{\n", f"\n{marker}\n{{\n", 1))
    with _ready(env, command) as run:
        assert _reused(run) == 0
        assert marker in _caddyfile(env).read_text()
        assert _serves(env).status_code == 200


# -- the pieces ------------------------------------------------------------------------------------

REUSE_WITHOUT_JINJA2 = """
import sys
sys.modules["jinja2"] = None  # importing it from here on raises ImportError
sys.modules["markupsafe"] = None
from entrypoint import config
from entrypoint.web import caddy
settings = config.load(dict(__import__("os").environ))
text = caddy.reusable_caddyfile(settings, caddy.render_key(settings))
sys.stdout.write(text or "NOT REUSED")
"""


def test_reuse_path_works_with_jinja2_unimportable(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _, text = ch.write_stamped(config.load(env))  # the subprocess loads the same settings from env
    out = subprocess.run([sys.executable, "-c", REUSE_WITHOUT_JINJA2], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == text


def _template_dir(tmp: Path, body: str = ":{{ http_port }} {\n\trespond 200\n}\n") -> Path:
    directory = tmp / "templates"
    directory.mkdir(exist_ok=True)
    (directory / caddy.TEMPLATE_NAME).write_text(body)
    return directory


def test_render_key_follows_every_input_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _template_dir(tmp_path, ':{{ http_port }} {\n{% include "part.j2" %}\n}\n')
    (directory / "part.j2").write_text("\trespond 200\n")
    settings = ch.base_settings(tmp_path)
    key = caddy.render_key(settings, directory)
    assert key is not None and key == caddy.render_key(ch.base_settings(tmp_path), directory)
    assert "respond 200" in caddy.render(settings, directory)  # the include is real

    changed: dict[str, str | None] = {
        "port": caddy.render_key(ch.base_settings(tmp_path, http_port=8081), directory),
        "public_metrics": caddy.render_key(ch.base_settings(tmp_path, public_metrics=True), directory),
        "stop_timeout": caddy.render_key(ch.base_settings(tmp_path, stop_timeout=5.0), directory),
    }
    (directory / "part.j2").write_text("\trespond 204\n")
    changed["included template"] = caddy.render_key(settings, directory)
    (directory / caddy.TEMPLATE_NAME).write_text(':{{ http_port }} {\n{% include "part.j2" %}\n}\n\n')
    changed["template"] = caddy.render_key(settings, directory)
    monkeypatch.setattr(caddy, "__version__", "999.0.0")
    changed["version"] = caddy.render_key(settings, directory)
    assert None not in changed.values()
    assert len({key, *changed.values()}) == 1 + len(changed), changed


def test_render_key_is_none_when_an_input_is_unusable(tmp_path: Path) -> None:
    assert caddy.render_key(ch.base_settings(tmp_path), tmp_path / "missing") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert caddy.render_key(ch.base_settings(tmp_path), empty) is None  # no Caddyfile.j2 in it
    bad_port = ch.base_settings(tmp_path, http_port=0)
    assert caddy.render_key(bad_port, _template_dir(tmp_path)) is None  # render reports it, as before


def _stamped(tmp: Path) -> tuple[Any, str, str]:
    settings = ch.base_settings(tmp)
    return (settings, *ch.write_stamped(settings))


def test_reusable_caddyfile_only_when_stamp_and_text_agree(tmp_path: Path) -> None:
    settings, key, text = _stamped(tmp_path)
    path, stamp = caddy.caddyfile_path(settings), caddy.render_stamp_path(settings)
    assert os.stat(stamp).st_mode & 0o777 == 0o644  # like the Caddyfile: nothing secret in it
    assert caddy.reusable_caddyfile(settings, key) == text
    assert caddy.reusable_caddyfile(settings, None) is None
    assert caddy.reusable_caddyfile(settings, "0" * 64) is None

    def refused_after(damage: Any) -> bool:
        _stamped(tmp_path)
        damage()
        return caddy.reusable_caddyfile(settings, key) is None

    assert refused_after(lambda: path.write_text(text[:-1]))
    assert refused_after(lambda: path.write_text(text + "\n# appended\n"))
    assert refused_after(lambda: path.write_bytes(text.encode() + b"\xff"))
    assert refused_after(path.unlink)
    assert refused_after(stamp.unlink)
    assert refused_after(lambda: stamp.write_text("{not json"))
    assert refused_after(lambda: stamp.write_text("[]"))
    assert refused_after(lambda: stamp.write_text(json.dumps({"render_key": key})))
