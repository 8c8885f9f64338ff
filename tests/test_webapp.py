"""Which web build is served: detection over small fake builds, and what the program does with the verdict.

The fake builds are written by the tests, shaped like the real ones
(reference/webapp-contract.md): a Vite ``index.html`` with a module script
under ``/assets/``, and a bundle that either reads ``window.POGLY_RUNTIME_CONFIG``
or hard-codes SpacetimeAuth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from entrypoint.config import Settings
from entrypoint.errors import Fatal
from entrypoint.web import webapp
from entrypoint.web.config_js import GLOBAL_NAME, KEY_OIDC_CLIENT_ID, KEY_OIDC_ISSUER, ensure_index_loads_config
from tests.harness import Running, base_env, free_port

BUNDLE = "assets/index-4f2a9c.js"
INDEX_PLAIN = f"""<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <title>Pogly</title>
    <script type="module" crossorigin src="/{BUNDLE}"></script>
    <link rel="modulepreload" crossorigin href="/assets/vendor-77aa01.js">
  </head>
  <body><div id="root"></div></body>
</html>
"""
# What the runtime-config build's bundle contains (property names survive minification).
RUNTIME_JS = (f'const c=window.{GLOBAL_NAME};const i=(c?.{KEY_OIDC_ISSUER}??"").trim(),'
              f'd=(c?.{KEY_OIDC_CLIENT_ID}??"").trim();export{{i,d}};\n')
# What the old build's bundle contains: src/index.tsx with the authority and client id literal.
HARD_CODED_JS = ('const o={authority:"https://auth.spacetimedb.com/oidc",client_id:"client_031Xyz9",'
                 'metadata:{issuer:"https://auth.spacetimedb.com/oidc"}};export{o};\n')
VENDOR_JS = "export const react='18.3.1';\n"


def index_loading(src: str) -> str:
    """The plain index with a config.js tag before the bundle, as upstream's index.html has it."""
    return INDEX_PLAIN.replace("    <script type=\"module\"", f'    <script src="{src}"></script>\n'
                               "    <script type=\"module\"", 1)


def build(root: Path, index: str | None, bundle: str | None, **extra: str | bytes) -> Path:
    """Write a fake web build: ``index.html``, the bundle, a vendor chunk, and ``extra`` files."""
    (root / "assets").mkdir(parents=True, exist_ok=True)
    if index is not None:
        (root / "index.html").write_text(index)
    if bundle is not None:
        (root / BUNDLE).write_text(bundle)
    (root / "assets" / "vendor-77aa01.js").write_text(VENDOR_JS)
    for name, content in extra.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def settings(tmp_path: Path, **kw: object) -> Settings:
    values: dict[str, object] = {"oidc_issuer": "https://auth.example.com/application/o/pogly/",
                                 "oidc_client_id": "pogly", "web_root": tmp_path / "web"}
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- detection


def test_runtime_config_build(tmp_path: Path) -> None:
    root = build(tmp_path / "web", index_loading("/config.js"), RUNTIME_JS)
    found = webapp.detect(root)
    assert found.verdict == webapp.RUNTIME_CONFIG
    assert found.index_loads_config is True and found.index_patched is False
    assert found.runtime_config_in == (BUNDLE,) and found.spacetimeauth_in == ()
    assert found.files_scanned == 2 and found.complete
    assert found.bytes_scanned == len(RUNTIME_JS) + len(VENDOR_JS)
    assert BUNDLE in found.reason


def test_hard_coded_build(tmp_path: Path) -> None:
    root = build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS)
    found = webapp.detect(root)
    assert found.verdict == webapp.HARD_CODED
    assert found.index_loads_config is False
    assert found.spacetimeauth_in == (BUNDLE,) and found.runtime_config_in == ()
    assert found.complete and "auth.spacetimedb.com/oidc" in found.reason


def test_client_id_alone_marks_a_hard_coded_build(tmp_path: Path) -> None:
    root = build(tmp_path / "web", INDEX_PLAIN, 'const c={client_id:"client_031Xyz9"};\n')
    assert webapp.detect(root).verdict == webapp.HARD_CODED


def test_both_strings_mean_runtime_config(tmp_path: Path) -> None:
    # A runtime-config build may keep SpacetimeAuth as a fallback: reading the global is what counts.
    root = build(tmp_path / "web", index_loading("/config.js"), HARD_CODED_JS + RUNTIME_JS)
    found = webapp.detect(root)
    assert found.verdict == webapp.RUNTIME_CONFIG
    assert found.runtime_config_in == (BUNDLE,) and found.spacetimeauth_in == (BUNDLE,)


def test_markers_in_different_files_are_reported_per_file(tmp_path: Path) -> None:
    root = build(tmp_path / "web", index_loading("/config.js"), HARD_CODED_JS,
                 **{"assets/auth-91bc.js": RUNTIME_JS})
    found = webapp.detect(root)
    assert found.verdict == webapp.RUNTIME_CONFIG
    assert found.runtime_config_in == ("assets/auth-91bc.js",) and found.spacetimeauth_in == (BUNDLE,)


def test_neither_string_is_unknown(tmp_path: Path) -> None:
    root = build(tmp_path / "web", index_loading("/config.js"), "console.log('some other app');\n")
    found = webapp.detect(root)
    assert found.verdict == webapp.UNKNOWN
    assert found.files_scanned == 2 and "none of 2" in found.reason and "loads config.js" in found.reason


def test_no_javascript_at_all_is_unknown(tmp_path: Path) -> None:
    root = tmp_path / "web"
    root.mkdir()
    (root / "index.html").write_text("<html><body>placeholder</body></html>")
    found = webapp.detect(root)
    assert found.verdict == webapp.UNKNOWN and found.files_scanned == 0 and "no JavaScript" in found.reason


def test_missing_index_is_unknown_with_the_reason(tmp_path: Path) -> None:
    root = build(tmp_path / "web", None, HARD_CODED_JS)
    found = webapp.detect(root)
    assert found.verdict == webapp.UNKNOWN
    assert not found.index_found and found.index_loads_config is None
    assert "index.html" in found.reason and "missing" in found.reason
    assert found.spacetimeauth_in == (BUNDLE,)  # still reported: what the files carry


def test_missing_web_root_is_unknown_with_the_reason(tmp_path: Path) -> None:
    found = webapp.detect(tmp_path / "nope")
    assert found.verdict == webapp.UNKNOWN and "does not exist" in found.reason
    (tmp_path / "file").write_text("x")
    assert "not a directory" in webapp.detect(tmp_path / "file").reason


@pytest.mark.parametrize("src", ["/config.js", "./config.js", "config.js", "/config.js?v=3"])
def test_index_loading_config_js_in_every_spelling(tmp_path: Path, src: str) -> None:
    found = webapp.detect(build(tmp_path / "web", index_loading(src), RUNTIME_JS))
    assert found.index_loads_config is True and found.config_after_bundle is False


def test_config_js_after_the_bundle_or_in_a_comment_does_not_count(tmp_path: Path) -> None:
    after = INDEX_PLAIN.replace("</head>", '<script src="/config.js"></script></head>')
    found = webapp.detect(build(tmp_path / "a", after, RUNTIME_JS))
    assert found.index_loads_config is False and found.config_after_bundle is True
    commented = INDEX_PLAIN.replace("<title>", '<!-- <script src="/config.js"></script> --><title>')
    found = webapp.detect(build(tmp_path / "b", commented, RUNTIME_JS))
    assert found.index_loads_config is False and found.config_after_bundle is False


def test_our_patch_is_told_apart_from_what_the_build_does(tmp_path: Path) -> None:
    root = build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS)
    assert ensure_index_loads_config(root) is True  # as the image build and every start do
    found = webapp.detect(root)
    assert found.index_patched is True and found.served_index_loads_config is True
    assert found.index_loads_config is False  # the build's own index.html (index.html.orig) did not
    assert found.verdict == webapp.HARD_CODED  # and loading config.js does not make the bundle read it


def test_an_unrelated_index_orig_is_not_mistaken_for_our_original(tmp_path: Path) -> None:
    root = build(tmp_path / "web", index_loading("/config.js"), RUNTIME_JS,
                 **{"index.html.orig": "<html>something else</html>"})
    found = webapp.detect(root)
    assert found.index_patched is False and found.index_loads_config is True


def test_huge_asset_is_read_only_up_to_the_cap_and_still_gets_a_verdict(tmp_path: Path) -> None:
    pad = b"/*" + b"x" * (webapp.MAX_FILE_BYTES + 1024 * 1024) + b"*/"
    # Hard-coded authority early; the runtime global only after the per-file cap.
    root = build(tmp_path / "web", INDEX_PLAIN, None,
                 **{BUNDLE: HARD_CODED_JS.encode() + pad + RUNTIME_JS.encode()})
    found = webapp.detect(root)
    assert found.bytes_scanned <= webapp.MAX_FILE_BYTES + len(VENDOR_JS)
    assert found.bytes_scanned >= webapp.MAX_FILE_BYTES
    assert not found.complete and any(BUNDLE in n and "cap" in n for n in found.not_read)
    # Not everything was read, so "hard-coded" (which can stop the container) is not claimed.
    assert found.verdict == webapp.UNKNOWN and "cannot be ruled out" in found.reason
    # The same huge file with the global early is a runtime-config build, read just as far.
    (root / BUNDLE).write_bytes(RUNTIME_JS.encode() + pad)
    found = webapp.detect(root)
    assert found.verdict == webapp.RUNTIME_CONFIG and found.bytes_scanned <= webapp.MAX_FILE_BYTES + len(VENDOR_JS)


def test_total_cap_bounds_many_files(tmp_path: Path) -> None:
    chunks = {f"assets/chunk-{i:02d}.js": "/*" + "y" * 1000 + "*/\n" for i in range(20)}
    root = build(tmp_path / "web", index_loading("/config.js"), RUNTIME_JS, **chunks)
    found = webapp.detect(root, max_file_bytes=4000, max_total_bytes=5000)
    assert found.bytes_scanned <= 5000
    assert found.runtime_config_in == (BUNDLE,)  # the bundle index.html names is read first
    assert found.verdict == webapp.RUNTIME_CONFIG and not found.complete
    assert any("total cap" in n for n in found.not_read)


def test_marker_split_across_chunk_boundaries_is_found(tmp_path: Path) -> None:
    for chunk in (3, 7, 16):
        for offset in range(chunk):
            root = build(tmp_path / f"web-{chunk}-{offset}", INDEX_PLAIN, " " * offset + RUNTIME_JS)
            found = webapp.detect(root, chunk_bytes=chunk)
            assert found.runtime_config_in == (BUNDLE,), (chunk, offset)


def test_symlink_out_of_the_web_root_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.js").write_text(RUNTIME_JS)
    root = build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS)
    (root / "assets" / "linked.js").symlink_to(outside / "secret.js")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    found = webapp.detect(root)
    assert "assets/linked.js" not in found.runtime_config_in and found.runtime_config_in == ()
    assert any(n.startswith("assets/linked.js: outside the web root") for n in found.not_read)
    assert not any("linked-dir" in n for n in (*found.runtime_config_in, *found.not_read))
    # What could not be read might have held the global: no "hard-coded" verdict on that basis.
    assert found.verdict == webapp.UNKNOWN


def test_symlink_inside_the_web_root_is_read(tmp_path: Path) -> None:
    root = build(tmp_path / "web", INDEX_PLAIN, None, **{"assets/real-1.js": RUNTIME_JS})
    (root / BUNDLE).symlink_to(root / "assets" / "real-1.js")
    assert webapp.detect(root).verdict == webapp.RUNTIME_CONFIG


def test_index_symlinked_out_of_the_root_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.html").write_text(index_loading("/config.js"))
    root = build(tmp_path / "web", None, RUNTIME_JS)
    (root / "index.html").symlink_to(tmp_path / "elsewhere.html")
    found = webapp.detect(root)
    assert found.verdict == webapp.UNKNOWN and "outside the web root" in found.reason


def test_a_fifo_named_like_an_asset_is_skipped_without_blocking(tmp_path: Path) -> None:
    root = build(tmp_path / "web", index_loading("/config.js"), RUNTIME_JS)
    os.mkfifo(root / "assets" / "pipe.js")
    found = webapp.detect(root)  # would hang forever if the FIFO were opened for a blocking read
    assert any(n.startswith("assets/pipe.js: not a regular file") for n in found.not_read)
    assert found.verdict == webapp.RUNTIME_CONFIG


def test_the_top_level_config_js_is_not_evidence(tmp_path: Path) -> None:
    # Upstream ships a placeholder config.js; ours replaces it when served. Neither says what the bundle reads.
    root = build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS,
                 **{"config.js": f"window.{GLOBAL_NAME} = window.{GLOBAL_NAME} || {{}};\n"})
    assert webapp.detect(root).verdict == webapp.HARD_CODED


# --------------------------------------------------------------------------- what the program does with it


def test_hard_coded_with_oidc_on_warns_with_the_fix(tmp_path: Path) -> None:
    s = settings(tmp_path)
    found = webapp.detect(build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS))
    with capture_logs() as cap:
        summary = webapp.report(s, found, served_loads_config=True)
    detected = [e for e in cap if e["event"] == "webapp.detected"]
    assert len(detected) == 1 and detected[0]["verdict"] == webapp.HARD_CODED
    assert detected[0]["index_patched"] is True  # served index did not load it before, does now
    (warning,) = [e for e in cap if e["event"] == "webapp.hard_coded_auth"]
    assert warning["log_level"] == "warning"
    assert "PR #92" in warning["message"] and "POGLY_IMAGE" in warning["message"]
    assert s.oidc_issuer in warning["message"]
    assert summary["verdict"] == webapp.HARD_CODED and summary["index_patched"] is True


def test_hard_coded_under_strict_mode_is_fatal_78(tmp_path: Path) -> None:
    found = webapp.detect(build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS))
    with pytest.raises(Fatal) as info:
        webapp.report(settings(tmp_path, strict_mode=True), found)
    assert info.value.exit_code == 78 and info.value.event == "webapp.hard_coded_auth"
    assert "STRICT_MODE" in info.value.message and "PR #92" in info.value.message


def test_hard_coded_with_oidc_off_is_only_reported(tmp_path: Path) -> None:
    found = webapp.detect(build(tmp_path / "web", INDEX_PLAIN, HARD_CODED_JS))
    s = settings(tmp_path, oidc_issuer="", oidc_client_id="")
    assert webapp.problem(s, found) is None
    with capture_logs() as cap:
        webapp.report(s, found)
    assert [e["event"] for e in cap] == ["webapp.detected"]


def test_runtime_config_build_is_logged_at_info(tmp_path: Path) -> None:
    found = webapp.detect(build(tmp_path / "web", index_loading("/config.js"), RUNTIME_JS))
    with capture_logs() as cap:
        webapp.report(replace(settings(tmp_path), strict_mode=True), found, served_loads_config=True)
    (event,) = cap
    assert event["event"] == "webapp.detected" and event["log_level"] == "info"
    assert event["index_loads_config"] is True and event["index_patched"] is False
    assert event["runtime_config_in"] == [BUNDLE] and event["bytes_scanned"] > 0


# --------------------------------------------------------------------------- the whole program


def hard_coded_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = base_env(tmp_path, **overrides)
    build(Path(env["POGLY_WEB_ROOT"]), INDEX_PLAIN, HARD_CODED_JS)
    return env


def test_strict_mode_with_a_hard_coded_build_exits_78(tmp_path: Path) -> None:
    # The provider is unreachable with a long timeout, so only the web build can end the start early.
    env = hard_coded_env(tmp_path, STRICT_MODE="true", OIDC_DISCOVERY_TIMEOUT="60",
                         OIDC_ISSUER=f"https://127.0.0.1:{free_port()}/realms/pogly")
    with Running(env) as run:
        assert run.wait(60) == 78
    (fatal,) = run.find(lambda e: e.get("event") == "webapp.hard_coded_auth")
    assert fatal["level"] == "error" and fatal["exit_code"] == 78
    assert "hard-codes SpacetimeAuth" in fatal["message"] and "POGLY_IMAGE" in fatal["message"]
    (detected,) = run.find(lambda e: e.get("event") == "webapp.detected")
    assert detected["verdict"] == webapp.HARD_CODED
    assert not run.find(lambda e: e.get("event") == "entrypoint.ready")


def test_hard_coded_build_warns_and_still_serves(tmp_path: Path) -> None:
    env = hard_coded_env(tmp_path)
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        (warning,) = run.find(lambda e: e.get("event") == "webapp.hard_coded_auth")
        assert warning["level"] == "warning" and "PR #92" in warning["message"]
        (detected,) = run.find(lambda e: e.get("event") == "webapp.detected")
        assert detected["verdict"] == webapp.HARD_CODED and detected["index_patched"] is True
        assert detected["spacetimeauth_in"] == [BUNDLE]
        status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()
        assert status["webapp"]["verdict"] == webapp.HARD_CODED
        shown = subprocess.run([sys.executable, "-m", "entrypoint", "status"], env=env, capture_output=True,
                               timeout=30)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"web app: {webapp.HARD_CODED}" in shown.stdout.decode()
        run.stop()


def test_check_prints_the_verdict(tmp_path: Path) -> None:
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    build(Path(env["POGLY_WEB_ROOT"]), index_loading("/config.js"), RUNTIME_JS)
    check = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, capture_output=True, timeout=60)
    out = check.stdout.decode()
    assert check.returncode == 0, out + check.stderr.decode()
    assert f"Web build: {webapp.RUNTIME_CONFIG} ({BUNDLE} reads window.{GLOBAL_NAME}" in out
    assert "OIDC provider: disabled" in out and "Redirect URIs" not in out
    settings_json = json.loads(out[: out.index("\nCaddyfile:")])["settings"]
    assert settings_json["oidc_issuer"] == "" and settings_json["oidc_client_id"] == ""


def test_check_under_strict_mode_refuses_a_hard_coded_build(tmp_path: Path) -> None:
    env = hard_coded_env(tmp_path, STRICT_MODE="true", OIDC_DISCOVERY_TIMEOUT="1",
                         OIDC_ISSUER=f"https://127.0.0.1:{free_port()}/realms/pogly")
    check = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, capture_output=True, timeout=60)
    out = check.stdout.decode()
    assert check.returncode == 78, out
    assert f"Web build: {webapp.HARD_CODED}" in out and "INVALID under STRICT_MODE" in out
    assert not (Path(env["POGLY_WEB_ROOT"]) / "index.html.orig").exists()  # check changes nothing
