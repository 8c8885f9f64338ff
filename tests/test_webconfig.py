"""config.js must reach the browser intact and harmless; index.html must load it exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from entrypoint.config import Settings
from entrypoint.web.config_js import (
    GLOBAL_NAME,
    KEY_OIDC_CLIENT_ID,
    KEY_OIDC_ISSUER,
    SCRIPT_TAG,
    ensure_index_loads_config,
    inject_config_script,
    render_config_js,
    runtime_config,
    write_config_js,
)

HOSTILE_CLIENT_ID = "</script><script>alert(1)</script>\u2028\u2029<!-- & \"q\" 'a' \\ é 🎥 --> ${x}`"
EVAL_IN_NODE = r"""
const fs = require('node:fs');
const vm = require('node:vm');
const [file, globalName, issuerKey, clientKey] = process.argv.slice(1);
const code = fs.readFileSync(file, 'utf8');
const window = {};
vm.runInNewContext(code, { window });
// Read exactly as the web app's src/Auth/oidc.ts does: the global, then the two upper-case keys.
process.stdout.write(JSON.stringify({
  globals: Object.keys(window),
  issuer: window[globalName][issuerKey],
  clientId: window[globalName][clientKey],
  config: window[globalName],
}));
"""

STOCK_INDEX = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <link rel="icon" href="/favicon.ico" />
    <!-- upstream: <script src="/analytics.js"></script> was removed -->
    <title>Pogly</title>
    <script type="module" crossorigin src="/assets/index-abc123.js"></script>
    <link rel="stylesheet" crossorigin href="/assets/index-abc123.css">
  </head>
  <body>
    <div id="root"></div>
  </body>
</html>
"""


def settings(tmp_path: Path, client_id: str = "pogly",
             issuer: str = "https://auth.example.com/application/o/pogly/") -> Settings:
    return Settings(
        oidc_issuer=issuer,
        oidc_client_id=client_id,
        stream_platform="youtube",
        stream_name="@somehandle",
        run_dir=tmp_path / "run",
        web_root=tmp_path / "web",
    )


def evaluate_in_node(path: Path) -> dict[str, object]:
    node = shutil.which("node")
    assert node, "node is required for this test"
    result = subprocess.run([node, "-e", EVAL_IN_NODE, str(path), GLOBAL_NAME, KEY_OIDC_ISSUER,
                             KEY_OIDC_CLIENT_ID], capture_output=True, timeout=30, check=True)
    seen: dict[str, object] = json.loads(result.stdout.decode("utf-8"))
    return seen


def test_the_keys_are_the_ones_the_web_app_reads() -> None:
    # reference/webapp-contract.md: src/Auth/oidc.ts reads window.POGLY_RUNTIME_CONFIG.OIDC_ISSUER / .OIDC_CLIENT_ID
    assert (GLOBAL_NAME, KEY_OIDC_ISSUER, KEY_OIDC_CLIENT_ID) == ("POGLY_RUNTIME_CONFIG", "OIDC_ISSUER",
                                                                  "OIDC_CLIENT_ID")


def test_hostile_values_survive_a_real_js_engine(tmp_path: Path) -> None:
    hostile_issuer = "https://auth.example.com/</script><!--x-->?a=1&b=\u2028\u2029/"
    s = settings(tmp_path, HOSTILE_CLIENT_ID, issuer=hostile_issuer)
    path = write_config_js(s)
    assert path == tmp_path / "run" / "config.js"
    seen = evaluate_in_node(path)
    assert seen["globals"] == [GLOBAL_NAME]
    assert seen["clientId"] == HOSTILE_CLIENT_ID
    assert seen["issuer"] == hostile_issuer
    assert seen["config"] == runtime_config(s)


def test_oidc_off_gives_the_web_app_empty_strings(tmp_path: Path) -> None:
    # Empty strings, not absent keys: the app's `??` fallback to a build-time value must not kick in.
    s = settings(tmp_path, "", issuer="")
    assert not s.oidc_enabled
    seen = evaluate_in_node(write_config_js(s))
    assert seen["issuer"] == "" and seen["clientId"] == ""


def test_raw_text_cannot_break_out_of_a_script_element(tmp_path: Path) -> None:
    text = render_config_js(settings(tmp_path, HOSTILE_CLIENT_ID))
    assert "</script" not in text.lower()
    assert "<" not in text and ">" not in text and "&" not in text
    assert "\u2028" not in text and "\u2029" not in text
    assert text.isascii()
    for escaped in ("\\u003c/script\\u003e", "\\u2028", "\\u2029", "\\u0026"):
        assert escaped in text

    class Scripts(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.scripts: list[str] = []
            self._in = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self._in = tag == "script"
            if self._in:
                self.scripts.append("")

        def handle_endtag(self, tag: str) -> None:
            self._in = False

        def handle_data(self, data: str) -> None:
            if self._in:
                self.scripts[-1] += data

    page = Scripts()
    page.feed(f"<html><head><script>{text}</script></head><body></body></html>")
    assert page.scripts == [text]  # inlined, it is still exactly one script


def test_config_keys_and_file_properties(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert runtime_config(s) == {
        KEY_OIDC_ISSUER: "https://auth.example.com/application/o/pogly/",
        KEY_OIDC_CLIENT_ID: "pogly",
        "configVersion": 2,
        "streamPlatform": "youtube",
        "streamName": "@somehandle",
    }
    path = write_config_js(s)
    assert path.read_text().startswith("// Written by pogly-entrypoint")
    assert f"window.{GLOBAL_NAME} = {{" in path.read_text()  # a plain assignment, as upstream writes it
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    write_config_js(s)  # rewriting leaves no temp files behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.js"]


def test_index_injection_is_idempotent_and_keeps_the_original_once(tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    index = web / "index.html"
    index.write_text(STOCK_INDEX)
    os.chmod(index, 0o640)

    assert ensure_index_loads_config(web) is True
    patched = index.read_text()
    assert patched.count("/config.js") == 1
    assert f'    {SCRIPT_TAG}<script type="module"' in patched  # before the app's first script
    assert patched.replace(SCRIPT_TAG, "") == STOCK_INDEX
    assert (web / "index.html.orig").read_text() == STOCK_INDEX
    assert index.stat().st_mode & 0o777 == 0o640

    for _ in range(3):  # container restarts
        assert ensure_index_loads_config(web) is True
    assert index.read_text() == patched
    assert sorted(p.name for p in web.iterdir()) == ["index.html", "index.html.orig"]

    # An upstream update replaces index.html: patched again, the first original stays.
    index.write_text(STOCK_INDEX.replace("abc123", "def456"))
    assert ensure_index_loads_config(web) is True
    assert index.read_text().count(SCRIPT_TAG) == 1
    assert (web / "index.html.orig").read_text() == STOCK_INDEX


def test_index_without_head_script_gets_tag_before_head_end(tmp_path: Path) -> None:
    html = "<html><head><title>x</title></head><body><script>boot()</script></body></html>"
    assert inject_config_script(html) == html.replace("</head>", SCRIPT_TAG + "</head>")


@pytest.mark.parametrize("existing", [
    '<script src="/config.js"></script>',
    "<script src='config.js?v=2' defer></script>",
    '<SCRIPT SRC="./config.js"></SCRIPT>',
])
def test_index_that_already_loads_config_is_left_alone(tmp_path: Path, existing: str) -> None:
    web = tmp_path / "web"
    web.mkdir()
    html = f"<html><head>{existing}<script src='/app.js'></script></head></html>"
    (web / "index.html").write_text(html)
    assert ensure_index_loads_config(web) is True
    assert (web / "index.html").read_text() == html
    assert not (web / "index.html.orig").exists()


def test_commented_out_config_script_does_not_count(tmp_path: Path) -> None:
    html = "<html><head><!-- <script src=\"/config.js\"></script> --><script src='/app.js'></script></head>"
    patched = inject_config_script(html)
    assert patched is not None
    assert patched.split("-->", 1)[1].startswith(SCRIPT_TAG + "<script src='/app.js'>")


def test_missing_index_is_a_reported_no_op(tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    assert ensure_index_loads_config(web) is False
    assert list(web.iterdir()) == []
    assert ensure_index_loads_config(tmp_path / "does-not-exist") is False


def test_non_utf8_bytes_are_preserved(tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    raw = b"<html><head><title>caf\xe9</title><script src='/a.js'></script></head></html>"
    (web / "index.html").write_bytes(raw)
    assert ensure_index_loads_config(web) is True
    assert (web / "index.html").read_bytes() == raw.replace(b"<script", SCRIPT_TAG.encode() + b"<script", 1)
    assert (web / "index.html.orig").read_bytes() == raw


def test_config_loaded_only_after_the_bundle_is_injected_before_it() -> None:
    # The web app reads window.POGLY_RUNTIME_CONFIG when its module runs: a config.js tag after the
    # bundle's script arrives too late, so it does not count as "already loads it".
    html = ('<html><head><script type="module" src="/assets/index-abc.js"></script>'
            '<script src="/config.js"></script></head><body></body></html>')
    patched = inject_config_script(html)
    assert patched is not None
    assert patched.index(SCRIPT_TAG) < patched.index("/assets/index-abc.js")
    assert inject_config_script(patched) is None
