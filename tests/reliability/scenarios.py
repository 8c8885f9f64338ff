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
_REAP_ANCHORS = ("Reaping (§1): tini (`waitpid(-1, WNOHANG)` loop, wakes ≥1/s), dumb-init (on SIGCHLD), s6 (on "
                 "SIGCHLD) and supervisord (one `reaped unknown pid` log line per orphan) leave 0 zombies of 20; "
                 "circus reaps lazily (20 zombies at 3 s, 0 at 7 s); honcho never (20 zombies forever). CPU and "
                 "descriptors with 1,000 orphans (§3 #22): not measured for any anchor")
_POGLY_ANCHORS = ("Pogly-specific: no anchor knows SpacetimeDB's lock, its identity volume or its publish; the "
                  "closest anchor feature, one-shot init (§1), keeps no state across boots and has no deadline")
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
        "\"exc_info\": true}`, the same with `event`/`message`/`child_fields` keys, and a plain `child.started`",
        "Its fields go under `child_fields`; our keys (`ts`, `level`, `event`, `service`, `stream`, `pid`, "
        "`message`) are ours alone; every child line is `event: \"child.output\"` with its text in `message` "
        "(issue 14; before, a message shaped like our event names became `caddy: entrypoint.exit`)",
        "honcho prefixes lines with the process name, supervisord keeps a file per program, none emits JSON "
        "(Supervisor#1326, #1337; §4 #9): no anchor merges a child's fields into its own events"),
    "test_hostile_logs.py::test_child_cannot_forge_a_console_line_of_ours": Scenario(
        "13.5",
        "`LOG_FORMAT=console`: a child's text with a carriage return, a form feed, U+2028 or (in JSON) a newline "
        "followed by a line shaped like one of ours (`<time> info entrypoint entrypoint.exit`)",
        "Everything after the break is an indented continuation line: every line that starts with a time is "
        "one we wrote, with the child's service",
        "honcho prefixes each line with the process name; tini, dumb-init, s6 and supervisord pass a carriage "
        "return through to the terminal, where it overwrites the line (§1 Logging)"),
    "test_hostile_logs.py::test_no_jwt_ever_reaches_the_output": Scenario(
        "13.5",
        "Property (hypothesis, 300 examples): random text around a JWT-shaped token, glued with `_`, `%22`, quotes, "
        "`Bearer `, newlines; through a child's stream and as a field of our own event",
        "The token (and its signature) never appears in the emitted JSON or console lines",
        _LOGS_ANCHORS),
    "test_hostile_logs.py::test_no_private_key_ever_reaches_the_output": Scenario(
        "13.5",
        "Property (hypothesis, 200 examples): a PEM private key of any kind inside random text, on its own lines "
        "or on one line with escaped newlines",
        "No line of the key's body appears in the emitted JSON or console lines",
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
    "test_broken_stdout.py::test_lines_batched_within_a_loop_callback_never_block_a_full_pipe_either": Scenario(
        "13.8",
        "Unit, a real pipe, inside the event loop (where lines wait for the end of the callback, issue 15): 200 "
        "lines of 1 KB in one callback into a pipe nobody reads, then the reader catches up",
        "The same bounds as line by line: no write blocks, whole lines only, one notice, then a `logs.dropped` line "
        "with the exact count",
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
    # -- the supervision anchors' matrix (§3), as PID 1 ------------------------------------------------
    "test_supervision_matrix.py::test_a_thousand_orphans_are_reaped_without_spin_or_fd_leak": Scenario(
        "13.matrix",
        "As PID 1, ready: a child double-forks 1,000 short-lived grandchildren (each orphaned at once), on the "
        "test's signal",
        "Every one reaped (no zombie, no orphan left in the namespace; `orphans_reaped` ≥ 1,001); PID 1 back to "
        "the descriptors it had; under 2 s of PID 1 CPU for the lot (a bound against a spinning reap loop, not a "
        "benchmark); `/readyz` still 200; SIGTERM → 0",
        _REAP_ANCHORS),
    "test_supervision_matrix.py::test_sigint_stops_caddy_then_spacetimedb_and_exits_0": Scenario(
        "13.matrix",
        "As PID 1, ready: SIGINT (Ctrl-C at `docker run -it`). SIGTERM's run is "
        "tests/test_pid1.py::test_full_stack_ready_then_sigterm_stops_caddy_first_and_spacetime_with_sigint",
        "Same as SIGTERM: one `signal.received` (SIGINT, stopping); Caddy SIGTERM and stopped, then SpacetimeDB "
        "SIGINT and stopped, in that order; exit 0, not 130",
        "s6: TERM/INT/QUIT to PID 1 are a shutdown (S3); tini and dumb-init forward it and exit with the child's "
        "code or 128+signal (T2, D2); honcho exits 130 on INT, 143 on TERM, which Kubernetes reads as a failure "
        "(§4 #4, tini#69); supervisord and circus always exit 0 (§1 Exit code)"),
    "test_supervision_matrix.py::test_exec_failure_is_127_after_the_crash_loop_and_a_non_executable_bin_is_78":
        Scenario(
            "13.matrix",
            "As PID 1: `SPACETIME_BIN` a plain file (mode 0644); then a script whose interpreter does not exist "
            "(passes the executable check, fails at exec)",
            "The plain file: exit 78 `config.invalid` naming `SPACETIME_BIN`, nothing started. The missing "
            "interpreter: each spawn fails (`child.spawn_failed` with the binary and a fix), counts as a death "
            "with the shell's 127, and the crash-loop verdict exits 127 after 5 tries; Caddy stopped. (The "
            "crash loop's own code and 128+signal: tests/test_pid1.py "
            "`test_crash_loop_gaps_grow_then_exit_with_the_childs_code`, "
            "`test_child_killed_by_signal_exits_128_plus_signal`)",
            "Failed exec is 127 in the §3 #5 matrix; tini and dumb-init exit with the child's code (T2, D2); "
            "supervisord retries a spawn error `startretries` times, then FATAL, and keeps running with exit 0 "
            "(V2, §1); circus's `max_retry=5` counts exactly these spawn failures, then gives the watcher up (C1)"),
    "test_supervision_matrix.py::test_crash_loop_of_a_child_exiting_0_is_not_exit_0": Scenario(
        "13.matrix",
        "As PID 1: SpacetimeDB exits 0 at once, every time (a wrapper that returns early)",
        "Five deaths in 120 s are a crash loop (`child.crash_loop`); the container exits 1, never 0 (0 means "
        "\"stopped on request\"), so Docker's `restart: on-failure` and a Job's `restartPolicy: OnFailure` "
        "restart it. Found by this test: it used to exit with the child's 0",
        "s6-overlay: a cont-init failure still exiting 0 is s6-overlay#183 (§4 #3); tini and dumb-init pass the "
        "child's 0 on (T2, D2); supervisord and circus always exit 0 (§1 Exit code)"),
    "test_supervision_matrix.py::test_grandchild_in_its_own_session_does_not_survive_sigterm": Scenario(
        "13.matrix",
        "As PID 1: SpacetimeDB (stand-in, `STANDIN_GRANDCHILD`) leaves a `sleep` in a session of its own, out of "
        "reach of a signal to its process group; SIGTERM",
        "Exit 0; SpacetimeDB stopped cleanly with SIGINT; the helper swept and named (`entrypoint.straggler_killed`, "
        "its PID and `sleep`), gone from the host",
        "dumb-init signals the child's process group and does not wait for it (D2, dumb-init#212); tini signals "
        "the child or, with `-g`, its group (T2); supervisord only with `killasgroup` (V1); circus SIGKILLs the "
        "whole tree (C2); none reaches another session but by the namespace's end (§4 #12)"),
    "test_supervision_matrix.py::test_grandchild_in_its_own_session_does_not_outlive_the_subreaper": Scenario(
        "13.matrix",
        "Not PID 1 but a subreaper (`make run`, `docker run --init`): the same helper in its own session; SIGTERM",
        "The helper, re-parented to us when SpacetimeDB exits, is swept at exit like PID 1's stragglers "
        "(`entrypoint.straggler_killed`: as a subreaper, our descendants only). Found by this test: the sweep "
        "used to run only as PID 1, and the helper outlived us under the host's init",
        "A subreaper anchor (tini `-s`) reaps but does not kill adopted descendants at exit (T1, T2)"),
    "test_supervision_matrix.py::test_sigstopped_spacetimedb_still_stops_cleanly_within_the_stop_timeout": Scenario(
        "13.matrix",
        "As PID 1, ready: SpacetimeDB frozen with SIGSTOP (a debugger, a cgroup freeze); `/readyz`; then SIGTERM "
        "(POGLY_STOP_TIMEOUT=8)",
        "Exit 0 within the stop timeout; SIGINT is followed by SIGCONT, so the frozen server wakes, logs "
        "`Shutting down server` and exits 0 (flushing its commit log). Before: SIGINT stayed pending and it was "
        "SIGKILLed at the end of its grace (`killed by SIGKILL`), losing up to 500 ms of acknowledged writes",
        "s6-supervise sends `down-signal` then SIGCONT (S2); tini and dumb-init forward the signal only, so a "
        "stopped child waits for the orchestrator's SIGKILL; supervisord and circus SIGKILL at their grace (V1, C2)"),
    "test_supervision_matrix.py::test_frozen_spacetimedb_turns_readyz_503": Scenario(
        "13.matrix",
        "As PID 1, ready: SpacetimeDB frozen with SIGSTOP in steady state (it accepts TCP, answers nothing)",
        "`/readyz` 503 with `spacetimedb: not answering /v1/ping within 2 s` and `spacetime.not_answering` "
        "logged; after SIGCONT 200 again (`spacetime.answering_again`). The ping is made when a probe asks "
        "(at most once per 2 s, shared by concurrent askers): no idle wake-ups. Found by this test: "
        "`/readyz` used to stay 200 indefinitely",
        "uvicorn's Multiprocess pings each worker (5 s timeout) and SIGKILLs a hung one (U1); s6 and the others "
        "watch only exits (§1 Readiness)"),
    "test_supervision_matrix.py::test_sigstopped_caddy_still_stops_within_its_grace": Scenario(
        "13.matrix",
        "As PID 1, ready: Caddy frozen with SIGSTOP; SIGTERM",
        "Caddy woken by SIGCONT after its SIGTERM: a graceful exit 0 within its grace; SpacetimeDB not delayed, "
        "stopped cleanly; exit 0 within the stop timeout",
        "As above: only s6-supervise follows the stop signal with SIGCONT (S2)"),
    "test_supervision_matrix.py::test_stop_wakes_a_frozen_child_so_it_handles_its_stop_signal": Scenario(
        "13.matrix",
        "In process, a real `sh` child with a SIGINT trap, SIGSTOPped, then `Child.stop` with a 30 s grace",
        "Its trap runs (exit 7, not killed), at once: the regression test of the SIGCONT after the stop signal "
        "(`supervision/process.py`)",
        "s6-supervise sends SIGCONT after the down-signal (S2)"),
    # -- monotonic clock ---------------------------------------------------------------------------------
    "test_wall_clock.py::test_crash_loop_verdict_and_backoff_with_the_wall_clock_jumping_hours": Scenario(
        "13.matrix",
        "The real program with its own `time.time()`/`time_ns()` jumping hours at every call, alternately "
        "forwards and backwards (a real jump would move the host's clock; time namespaces offset only the "
        "monotonic and boot clocks); SpacetimeDB exits 3 at once, every time",
        "Restart gaps still grow (4 restarts, the first within 0.2 s) and the 5th death within 120 s is the "
        "crash-loop verdict: exit 3. Deadlines, backoff and the window use the monotonic clock; the wall clock "
        "only labels `/status` for people",
        "supervisord tests a clock rolled back (`clock_rollback`, §3 #21); not measured for the others"),
    "test_wall_clock.py::test_start_timeout_fires_on_time_with_the_wall_clock_jumping_hours": Scenario(
        "13.matrix",
        "As above, with SpacetimeDB never answering `/v1/ping` (`STANDIN_PING_HANG`) and POGLY_START_TIMEOUT=3; "
        "`/status` read to prove the wrapper is in force",
        "Exit 69 `child.ready_timeout` after 3 s of monotonic time (uptime between 3 and 30 s), one start, no "
        "restart",
        "supervisord tests a clock rolled back (§3 #21); s6's readiness timeouts are monotonic (S5)"),
    # -- Pogly's own ---------------------------------------------------------------------------------------
    "test_pogly_faults.py::test_lock_held_by_a_server_outside_the_namespace_then_a_stale_pidfile": Scenario(
        "13.matrix",
        "As PID 1: another SpacetimeDB outside our PID namespace holds the data dir's flock; it stops; then a "
        "holder SIGKILLed leaves `spacetime.pid` naming a dead PID. (Held past POGLY_LOCK_WAIT → 69 and our own "
        "leftover stopped: tests/test_lifecycle.py)",
        "`spacetime.lock_held` naming the holder (PID from the file), repeated with backoff; the holder neither "
        "signalled nor its file touched (same inode); ready once it exits. The stale pidfile delays nothing: no "
        "`lock_held` at all (the lock is an flock, not the file's existence)",
        _POGLY_ANCHORS),
    "test_pogly_faults.py::test_one_signing_key_lost_is_78_naming_it_and_the_data_is_untouched": Scenario(
        "13.matrix",
        "As PID 1, after a first boot: `id_ecdsa.pub` deleted from the config volume; restart",
        "Exit 78 `identity.keys_incomplete` naming the missing file and warning not to delete the other half; "
        "SpacetimeDB never started, no key minted, the data dir byte-for-byte unchanged",
        _POGLY_ANCHORS),
    "test_pogly_faults.py::test_both_signing_keys_lost_is_78_token_rejected_and_nothing_is_rewritten": Scenario(
        "13.matrix",
        "As PID 1, after a first boot: both `id_ecdsa` and `id_ecdsa.pub` deleted (SpacetimeDB mints a new pair); "
        "restart",
        "Exit 78 `identity.token_rejected`: the stored token no longer verifies; the message says to restore the "
        "keys from the backup; `cli.toml` not rewritten, nothing published",
        _POGLY_ANCHORS),
    "test_pogly_faults.py::test_config_volume_of_another_installation_is_78_not_owner": Scenario(
        "13.matrix",
        "As PID 1, SpacetimeDB 1.7.0 and 1.9.0 (the two owner-error shapes: 500 `Permission denied` / 403 "
        "`not authorized`): the config volume of installation B beside the data of installation A (the wrong "
        "backup). (`cli.toml` lost: tests/test_lifecycle.py `test_database_owned_by_another_identity_exits_78`)",
        "Exit 78 `publish.not_owner` in both shapes; the data dir byte-for-byte unchanged, the token not rewritten",
        _POGLY_ANCHORS),
    "test_pogly_faults.py::test_publish_cut_mid_upload_is_retried_and_creates_one_database": Scenario(
        "13.matrix",
        "As PID 1, first boot: SpacetimeDB drops the connection after 4 bytes of the module upload "
        "(`STANDIN_PUBLISH_CUT`, once)",
        "One `spacetime.retrying` (`publish pogly`), then `publish.created` once; one database, its first-boot "
        "Config applied; ready; SIGTERM → 0",
        _PUBLISH_ANCHORS),
    "test_pogly_faults.py::test_spacetimedb_dying_during_publish_is_restarted_and_the_publish_completes": Scenario(
        "13.matrix",
        "As PID 1, first boot: SpacetimeDB SIGKILLed mid-upload (`STANDIN_PUBLISH_DIE`, once; pidfile left)",
        "`child.exited` (killed by SIGKILL), restarted; the publish retried against the new run: `publish.created`, "
        "one database, onboarding closed; ready; no internal error",
        _PUBLISH_ANCHORS),
    "test_pogly_faults.py::test_spacetimedb_hanging_on_ping_is_69_after_the_start_timeout": Scenario(
        "13.matrix",
        "As PID 1: SpacetimeDB accepts connections and reads `GET /v1/ping` but never answers "
        "(`STANDIN_PING_HANG`), POGLY_START_TIMEOUT=3",
        "Exit 69 `child.ready_timeout` naming POGLY_START_TIMEOUT and 3 s; SpacetimeDB then stopped with SIGINT "
        "(exit 0, not killed); nothing published, never ready",
        "s6-notifyoncheck's global timeout defaults to ∞ (S5), s6-overlay's start-up timeout was flipped to ∞ "
        "(§4 #8); supervisord's RUNNING means up for `startsecs`, no probe (V1); no anchor probes over HTTP"),
    "test_pogly_faults.py::test_oidc_provider_flapping_is_never_fatal_and_restarts_nothing": Scenario(
        "13.matrix",
        "As PID 1: the real `oidc-provider` down at start, then up, down, up, down",
        "Ready throughout: `unverified` at start, `verified` once it answered (background re-check), and it stays "
        "`verified` while the provider is gone (its metadata was checked; a restart checks again); `/readyz` 200 "
        "every time; never `oidc.invalid`/`oidc.unavailable`; no child exited or restarted; SIGTERM → 0",
        "Not applicable: no anchor checks an identity provider"),
    "test_pogly_faults.py::test_public_port_taken_is_exit_1_naming_pogly_http_port": Scenario(
        "13.matrix",
        "As PID 1: another process listens on POGLY_HTTP_PORT",
        "Exit 1 (Caddy's failed start, not retried) with `caddy.startup_failed` `variable: POGLY_HTTP_PORT`, "
        "the port and the fix (\"already in use … set POGLY_HTTP_PORT to a free port\"); one Caddy start; "
        "SpacetimeDB stopped cleanly. Before: only Caddy's own words in the quoted last lines",
        "tini and dumb-init exit with Caddy's 1 (T2, D2); supervisord retries `startretries` times, then FATAL, and "
        "the container stays up (§1 Critical child dies, Supervisor#712)"),
    "test_env_fuzz.py::test_run_starts_and_stops_0_or_exits_78_naming_the_variable": Scenario(
        "13.4",
        "Property (hypothesis, every variable of the table, 6 examples each; `POGLY_FUZZ_RUN_EXAMPLES` for more): "
        "the real `run` with the variable set to arbitrary bytes (not UTF-8, controls, up to 64 KiB; path values "
        "under the test's directory)",
        "Refused by `config.load` → exit 78 naming the variable, nothing created; accepted → both children start, "
        "`/readyz` 200, SIGTERM → 0, or 78 naming the variable when what it points at is unusable (a module dir "
        "without the `.wasm`); never a traceback, 1 or 70 (but a valid port some other process holds, named); "
        "no `.tmp` file left; no directory outside the configured paths (and `$HOME/.config`, the CLI link)",
        _ENV_ANCHORS),
}
