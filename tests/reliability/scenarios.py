"""The reliability scenarios: what each test in ``tests/reliability`` tries, what we do, what the anchors do.

One entry per test function (``<file>::<test>``).  ``bench/reliability_table.py``
renders this table, with each test's result from the last run
(``test-artifacts/reliability.json``, written by this directory's conftest),
into ``docs/reliability.md``; ``test_reliability_doc.py`` checks that every
test has an entry and a row.  "Anchors" are the supervisors compared in
``/work/shared/reference/supervisor-anchors.md`` (section numbers refer to it).
"""

from __future__ import annotations

from typing import NamedTuple


class Scenario(NamedTuple):
    fault: str  # "13.1" = issue 13, fault 1; "13.matrix" = its list of scenarios to cover
    tried: str  # what the test does to us
    ours: str  # what we do about it
    anchors: str  # what the anchor supervisors do, where known


_LOGS_ANCHORS = ("tini, dumb-init and s6 pass a child's output through untouched; supervisord, circus and "
                 "honcho write it to files or prefix it (§1 Logging). None parses it or redacts anything: "
                 "nothing to blind, and nothing hides a leaked key either")
_NO_HTTP_READINESS = ("No anchor answers readiness over HTTP: s6-overlay has none (s6-overlay#280), supervisord "
                      "an XML-RPC control API (§1 Status/CLI, §4 #16)")
_STDOUT_ANCHORS = ("tini and dumb-init never write to stdout themselves (the children inherit it); "
                   "supervisord logging to /dev/fd/1 fails with 'Illegal seek' (docker/docs#17298, §4 #9); "
                   "buffered child output looks like lost logs (§4 #10). A blocked pipe blocks any of them "
                   "that writes (not measured)")
_PUBLISH_ANCHORS = ("Pogly-specific. The closest anchor feature, one-shot init (s6-rc oneshots, my_init's "
                    "/etc/my_init.d, §1 One-shot init), keeps no state across boots")
_DISK_ANCHORS = "Not documented for any anchor"
_ENV_ANCHORS = ("Env / templating (§1): tini and dumb-init read no configuration from the environment; s6's "
                "`with-contenv` imports it as it is; supervisord (`%(ENV_X)s`) and circus (`$(circus.env.X)`) paste "
                "values into their config unchecked. None validates values against a table; a bad one surfaces "
                "where it is used (not measured)")

SCENARIOS: dict[str, Scenario] = {
    # -- fault 1 and 5: hostile log content --------------------------------------------------------
    "test_hostile_logs.py::test_key_marker_in_a_request_header_does_not_blind_the_caddy_log": Scenario(
        "13.1",
        "Whole program, real Caddy: an anonymous request with `User-Agent: -----BEGIN EC PRIVATE KEY-----`, then "
        "more requests and SIGTERM",
        "The header value is redacted once the access-log line is parsed; a BEGIN marker inside a JSON line starts "
        "no key block. Later access-log lines and Caddy's shutdown lines are all in the log",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_a_key_block_ends_at_a_line_that_cannot_be_key_material": Scenario(
        "13.1",
        "A child prints a BEGIN marker, one base64 line, then ordinary log lines",
        "The key block ends at the first line that cannot be key material; that line and the rest are shown; "
        "`logs.key_redacted` says 1 line was hidden",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_a_key_block_is_bounded": Scenario(
        "13.1",
        "A BEGIN marker followed by an endless run of base64 lines",
        "The block ends after its bound (400 lines / 32 KiB by default; 10 in the test)",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_jwt_after_a_word_character_is_redacted": Scenario(
        "13.5",
        "A JWT right after a word character: `session_eyJ…`, `%22eyJ…`, `X-Session: sid_eyJ…`",
        "Redacted: the JWT pattern needs no word boundary and takes every following dot-segment",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_jwt_as_a_json_key_and_token_in_a_python_dict_are_redacted": Scenario(
        "13.5",
        "A JWT used as a JSON key; `{'token': '…'}`; a `token` field and a `Cookie` header in a child's JSON",
        "Keys are redacted like values; quotes of either kind around `token=`/`secret=`/`password=`; fields "
        "named like a secret have their values redacted whatever they look like",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_child_cannot_forge_our_events_or_keys": Scenario(
        "13.5",
        "A child prints `{\"msg\": \"entrypoint.exit\", \"exit_code\": 0, \"service\": \"entrypoint\", \"ts\": …, "
        "\"exc_info\": true}` and a plain `child.started`",
        "Its fields go under `child_fields`; our keys (`ts`, `level`, `event`, `service`, `stream`, `pid`) are ours "
        "alone; a message shaped like our event names becomes `caddy: entrypoint.exit`",
        "honcho prefixes lines with the process name, supervisord keeps a file per program, none emits JSON "
        "(Supervisor#1326, #1337; §4 #9): no anchor merges a child's fields into its own events"),
    "test_hostile_logs.py::test_no_jwt_ever_reaches_the_output": Scenario(
        "13.5",
        "Property (hypothesis, 300 examples): random text around a JWT-shaped token, glued with `_`, `%22`, quotes, "
        "`Bearer `, newlines; through a child's stream and as a field of our own event",
        "The token (and its signature) never appears in the emitted JSON",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_no_private_key_ever_reaches_the_output": Scenario(
        "13.5",
        "Property (hypothesis, 200 examples): a PEM private key of any kind inside random text, on its own lines "
        "or on one line with escaped newlines",
        "No line of the key's body appears in the emitted JSON",
        _LOGS_ANCHORS),
    # -- fault 2: readiness ------------------------------------------------------------------------
    "test_readiness_flood.py::test_flood_of_readyz_on_the_public_port_does_not_flip_readiness": Scenario(
        "13.2",
        "Whole program, real Caddy: 4 rounds of 300 concurrent `GET /readyz` on the public port, a kubelet-style "
        "probe (1 s timeout) throughout, then the exec probe",
        "All 1,200 answer 200, and every probe too. Caddy keeps at most 16 connections to the health server "
        "(`max_conns_per_host`; the rest queue in Caddy); past 64 connections the health server still answers "
        "each connection once; 503 only past 256",
        _NO_HTTP_READINESS),
    "test_readiness_flood.py::test_slow_request_bodies_through_caddy_do_not_hold_the_health_server": Scenario(
        "13.2",
        "80 requests through the public port that declare a body and send 1 byte of it, then probes",
        "The health server answers as soon as the request head is in and closes instead of waiting for a body; "
        "probes stay 200 within 1 s",
        _NO_HTTP_READINESS),
    # -- fault 3: first-boot config ----------------------------------------------------------------
    "test_first_boot.py::test_state_write_lost_to_a_full_config_volume_leaves_onboarding_closed": Scenario(
        "13.3",
        "Whole program; the config volume is a tmpfs filled to its last page: the state write right after "
        "`publish.created` fails; restart with space; a stranger calls Pogly's `SetConfig` on the public port",
        "The first-boot Config is applied before anything is recorded; the failed write is exit 78 "
        "(`config.dir_unwritable`, naming `POGLY_CONFIG_DIR`, the file and ENOSPC, no temp file left); after the "
        "restart `SetConfig` is refused and the owner is unchanged",
        _PUBLISH_ANCHORS),
    "test_first_boot.py::test_database_created_without_its_first_boot_config_is_repaired_at_the_next_start":
        Scenario(
            "13.3",
            "A database created by our identity whose first-boot Config and state were never written (a crash "
            "right after the create); then a normal start and a stranger's `SetConfig`",
            "The database decides: `ConfigInit` false in a database we own is configured now "
            "(`config.first_boot_applied`, warning, `repaired: true`); `SetConfig` is refused",
            _PUBLISH_ANCHORS),
    # -- fault 6: disks and modules ----------------------------------------------------------------
    "test_disk_and_modules.py::test_full_run_dir_exits_78_naming_the_directory": Scenario(
        "13.6",
        "Whole program with `POGLY_RUN_DIR` a full tmpfs (OIDC off)",
        "Exit 78, `config.dir_unwritable` naming `POGLY_RUN_DIR`, `config.js` and ENOSPC, no traceback",
        _DISK_ANCHORS),
    "test_disk_and_modules.py::test_empty_wasm_is_refused_naming_the_file": Scenario(
        "13.6",
        "Whole program with a zero-byte `pogly.wasm`",
        "Exit 78, `publish.module_invalid` naming the file; nothing is published",
        _PUBLISH_ANCHORS),
    "test_disk_and_modules.py::test_a_file_that_is_not_webassembly_is_refused": Scenario(
        "13.6",
        "Whole program with an HTML page saved as `pogly.wasm`",
        "Exit 78, `publish.module_invalid`: no `\\0asm` header",
        _PUBLISH_ANCHORS),
    "test_disk_and_modules.py::test_full_volume_while_writing_the_token_keeps_the_old_token": Scenario(
        "13.matrix",
        "A full tmpfs while `cli.toml` (the publisher token) is rewritten",
        "`WriteFailed` names the file and ENOSPC (an exit-78 error); the old token is intact; no temp file left",
        _DISK_ANCHORS),
    "test_disk_and_modules.py::test_write_failed_is_an_oserror_and_an_exit_78": Scenario(
        "13.6",
        "Unit: the error a failed atomic write raises",
        "An `OSError` (errno, filename) for code that handles those, and a `Fatal` (exit 78) for code that does "
        "not; `fatal(variable, dir)` names the variable",
        _DISK_ANCHORS),
    # -- fault 4: hostile environment values --------------------------------------------------------
    "test_hostile_env.py::test_hostile_value_is_exit_78_naming_the_variable": Scenario(
        "13.4",
        "Whole program, `check` and `run`, environment as bytes, every path under the test's directory: "
        "`OWNER_SUBJECTS`/`OIDC_CLIENT_ID` not UTF-8, a newline or an escape sequence in a value, "
        "`POGLY_HTTP_PORT=²` / `８０`, `２５`/`inf`/`NaN` seconds, a run dir not UTF-8, whitespace-only "
        "data/config/run dirs, a 300-byte path component, a 4.4 KB path, `POGLY_WEB_ROOT=/etc/passwd`, the module "
        "dir set to the `.wasm`, a config dir through a file, 64 KiB of `MODULES` (20 cases)",
        "Exit 78, one `config.invalid` problem line naming the variable, its value (invalid bytes as `\\xNN`, "
        "control characters escaped, cut at 120 characters, secrets masked) and the fix; no traceback; nothing "
        "created (not in the configured paths, the working directory, `TMPDIR` or the old defaults `/stdb`, "
        "`/root/.spacetime`, `/run/pogly`). Before: tracebacks (rc 1), exit 70, or silently accepted/defaulted",
        _ENV_ANCHORS),
    "test_hostile_env.py::test_invalid_utf8_in_any_variable_is_exit_78_naming_it": Scenario(
        "13.4",
        "Whole program, `check` and `run`: each of the 26 variables in turn set to its default followed by bytes "
        "that are not UTF-8",
        "Exit 78 naming that variable, the bytes shown as `\\xNN`; the refusal comes before any parser (Python "
        "hands such bytes over as lone surrogates, which fail wherever they are written)",
        _ENV_ANCHORS),
    "test_hostile_env.py::test_refused_values_are_shown_safely_and_secrets_masked": Scenario(
        "13.4",
        "Unit: a problem whose value holds invalid bytes, an escape, a bidi override, quotes, 506 characters; a "
        "secret-named variable that is not UTF-8; `read()` (status/probe) with invalid bytes",
        "One printable line: `\\xff`, `\\x1b`, `\\u202e` escaped, cut with the length; the secret masked "
        "(`s3…(18 chars)`)",
        _ENV_ANCHORS),
    "test_hostile_env.py::test_prespawn_with_a_path_the_kernel_refuses_falls_back_to_the_in_loop_start": Scenario(
        "13.4",
        "Unit: the pre-loop SpacetimeDB spawn with a data dir of a 300-byte component (settings that bypass "
        "`config.load`)",
        "No early spawn (`None`): the supervisor starts it and reports. Before: `ENAMETOOLONG` from `is_dir()` as a "
        "raw traceback, rc 1",
        _ENV_ANCHORS),
    "test_env_fuzz.py::test_load_returns_settings_or_a_config_error_naming_the_variable": Scenario(
        "13.4",
        "Property (hypothesis, 1,500 examples): one variable of the table set to arbitrary text (lone surrogates, "
        "NUL, C0/C1 controls, Unicode digits and spaces, near-valid pieces, up to 64 KiB), through `load()` and "
        "`read()`",
        "`Settings` whose values all encode as UTF-8, or `ConfigError` whose every problem names that variable on "
        "one printable line under 2,000 characters; never another exception",
        _ENV_ANCHORS),
    "test_env_fuzz.py::test_check_exits_0_or_78_and_writes_nothing": Scenario(
        "13.4",
        "Property (hypothesis, 25 examples; `POGLY_FUZZ_CHECK_EXAMPLES` for more, 400 pass): the real `check` with "
        "one variable set to arbitrary bytes (not UTF-8, controls, up to 64 KiB)",
        "Exit 0 or 78 (never 1 or 70), no traceback, 78 names the variable (or the Caddyfile); no file or directory "
        "created or changed anywhere: the configured paths, the working directory, `TMPDIR`, a path the value "
        "names, the defaults",
        _ENV_ANCHORS),
    # -- fault 8: stdout -------------------------------------------------------------------------------
    "test_broken_stdout.py::test_stdout_reader_killed_keeps_supervising_and_obeys_sigterm": Scenario(
        "13.8",
        "Whole program (subreaper), stdout a FIFO whose reader is killed; requests; Caddy SIGKILLed; SIGTERM",
        "Lines are dropped and counted (one notice on stderr); Caddy is restarted and `/readyz` is 200 again; "
        "SIGTERM: exit 0 within the stop timeout, SpacetimeDB stopped with SIGINT, no child left running",
        _STDOUT_ANCHORS),
    "test_broken_stdout.py::test_stdout_reader_killed_pid1_obeys_the_first_sigterm": Scenario(
        "13.8",
        "As PID 1, stdout's reader killed, one SIGTERM",
        "Exit 0 within the stop timeout, SpacetimeDB stopped cleanly",
        _STDOUT_ANCHORS),
    "test_broken_stdout.py::test_stdout_reader_stopped_pid1_neither_blocks_caddy_nor_the_stop": Scenario(
        "13.8",
        "As PID 1, stdout's reader stopped (SIGSTOP): 400 requests, each an access-log line, fill the pipe; SIGTERM",
        "No write blocks: up to 256 KiB wait, the rest is dropped and counted; every request is answered "
        "(Caddy's own log pipe never backs up); SIGTERM: exit 0 within the stop timeout",
        _STDOUT_ANCHORS),
    "test_broken_stdout.py::test_log_writes_to_a_full_pipe_never_block_and_say_what_was_dropped": Scenario(
        "13.8",
        "Unit, a real pipe: 200 lines of 1 KB into a pipe nobody reads, then the reader catches up",
        "No write blocks; whole lines only; one notice on stderr; once lines flow again a `logs.dropped` line "
        "gives the exact count",
        _STDOUT_ANCHORS),
    "test_broken_stdout.py::test_log_writes_after_the_reader_is_gone_never_raise": Scenario(
        "13.8",
        "Unit, a real pipe: the reader closed (EPIPE), stderr closed as well, a descriptor that is not open "
        "(EBADF)",
        "Never an exception: lines are dropped and counted, the notice goes to stderr once, or nowhere",
        _STDOUT_ANCHORS),
    # -- fault 7: a hanging helper -----------------------------------------------------------------
    "test_caddy_validate_hang.py::test_run_capture_raises_timeout_and_leaves_nothing_behind": Scenario(
        "13.7",
        "A short helper (`caddy validate`, `oidc-check`) that never exits, run with a 0.5 s deadline",
        "Killed at its deadline and reaped; the caller gets `TimeoutError`, not an exit status to misread",
        "Not applicable: no anchor validates a child's configuration before starting it"),
    "test_caddy_validate_hang.py::test_hanging_caddy_validate_exits_69_caddy_validate_timeout": Scenario(
        "13.7",
        "`CADDY_BIN` hangs on `caddy validate` (the real Caddy service's prepare step, deadline shortened)",
        "Exit 69 `caddy.validate_timeout` naming the deadline and the binary (it was 78 `caddy.invalid_config`: "
        "the kill read as a failed validation, and Python's TimeoutError is an OSError)",
        "Not applicable: no anchor validates a child's configuration before starting it"),
}
