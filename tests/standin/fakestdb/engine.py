"""Databases, tables, transactions, durability and the Pogly-shaped module.

Durability model (reference §7): a commit is applied in memory and acknowledged at once; its record
is queued and only reaches the data directory when the background flusher runs (every 500 ms, like
the real commitlog fsync interval) or at SIGINT shutdown.  SIGTERM/SIGKILL therefore lose the last
<500 ms of acknowledged writes, exactly the hazard the supervisor must avoid by sending SIGINT.

On disk (all JSON lines, append-only; the formats are the stand-in's own, only the layout mimics
the real data dir):

* ``control-db/standin-control.jsonl``: databases, owners, names, replica ids, program hashes.
* ``replicas/<id>/clog/00000000000000000000.stdb.log``: one line per committed transaction.
* ``replicas/<id>/module_logs/YYYY-MM-DD.log``: module logs (NDJSON, written through at once).
* ``program-bytes/<2 hex>/<62 hex>``: uploaded module bytes, content-addressed by SHA-256.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .auth import from_claims
from .common import Version, now_micros

Row = list[Any]
COLUMN_TYPES = ("U32", "U64", "I32", "String", "Bool", "Identity", "ConnectionId")
INT_RANGES = {"U32": (0, 2**32 - 1), "U64": (0, 2**64 - 1), "I32": (-(2**31), 2**31 - 1)}
LOG_LEVELS = ("Error", "Warn", "Info", "Debug", "Trace", "Panic")
POGLY_MARKER = b"pogly"
FAIL_MARKER = b"standin:fail-publish"


class DbError(Exception):
    """A request-level failure with the HTTP status and text the real server would answer."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


# ---------------------------------------------------------------------------------------------
# durability


class Durability:
    """Queues committed records and writes+fsyncs them in batches (``interval`` seconds apart)."""

    def __init__(self, enabled: bool, interval: float) -> None:
        self.enabled = enabled
        self.interval = interval
        self._pending: dict[str, list[bytes]] = {}
        self._fds: dict[str, int] = {}

    def append(self, path: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        self._pending.setdefault(path, []).append(line)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._fds[path] = fd
        return fd

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for path, lines in pending.items():
            fd = self._fd(path)
            data = b"".join(lines)
            while data:
                n = os.write(fd, data)
                data = data[n:]
            os.fsync(fd)

    async def run(self) -> None:
        """Flush on a fixed 500 ms cadence (phase kept, like a tokio interval)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.interval
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self.flush()


def read_log_lines(path: str) -> list[dict[str, Any]]:
    """Read a JSON-lines log, dropping (and truncating away) a torn last record left by a kill."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            records.append(json.loads(data[pos:nl]))
        except ValueError:
            break
        pos = nl + 1
        good_end = pos
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


# ---------------------------------------------------------------------------------------------
# tables and transactions


@dataclass
class TableDef:
    name: str
    table_id: int
    columns: list[tuple[str, str]]
    public: bool = True
    primary_key: str | None = None
    autoinc: str | None = None

    def col_index(self, name: str) -> int:
        for i, (cname, _) in enumerate(self.columns):
            if cname == name:
                return i
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "table_id": self.table_id,
            "columns": [list(c) for c in self.columns],
            "public": self.public,
            "primary_key": self.primary_key,
            "autoinc": self.autoinc,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TableDef:
        return cls(
            d["name"], d["table_id"], [(c[0], c[1]) for c in d["columns"]], d["public"], d["primary_key"],
            d["autoinc"],
        )


class Table:
    def __init__(self, tdef: TableDef) -> None:
        self.tdef = tdef
        self.rows: dict[int, Row] = {}
        self.next_rowid = 1
        self.seq = 1
        self.pk_col = tdef.col_index(tdef.primary_key) if tdef.primary_key else None
        self.pk_index: dict[Any, int] = {}

    def pk_of(self, row: Row) -> Any:
        return None if self.pk_col is None else row[self.pk_col]


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Tx:
    """Applies changes immediately, keeps an undo list, and logs the ops on commit."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.ops: list[list[Any]] = []
        self._undo: list[Callable[[], None]] = []
        self.inserted = 0
        self.deleted = 0
        self.updated = 0

    def create_table(self, tdef: TableDef) -> None:
        self.db.tables[tdef.name] = Table(tdef)
        self.ops.append(["create", tdef.to_json()])
        self._undo.append(lambda: self.db.tables.pop(tdef.name, None))

    def insert(self, table: Table, row: Row) -> Row:
        row = list(row)
        if table.tdef.autoinc is not None:
            ai = table.tdef.col_index(table.tdef.autoinc)
            if row[ai] in (0, None):
                row[ai] = table.seq
            table.seq = max(table.seq, int(row[ai]) + 1)
        pk = table.pk_of(row)
        if table.pk_col is not None and pk in table.pk_index:
            col = table.tdef.primary_key
            raise DbError(
                400,
                f"Duplicate insertion of row violates unique constraint `{table.tdef.name}_{col}_key` "
                f"on column `{col}`: {format_value(pk)}",
            )
        rowid = table.next_rowid
        table.next_rowid += 1
        self._raw_insert(table, rowid, row)
        self.ops.append(["ins", table.tdef.name, rowid, row])
        self._undo.append(lambda: self._raw_delete(table, rowid))
        self.inserted += 1
        return row

    def delete(self, table: Table, rowid: int) -> None:
        old = table.rows[rowid]
        self._raw_delete(table, rowid)
        self.ops.append(["del", table.tdef.name, rowid])
        self._undo.append(lambda: self._raw_insert(table, rowid, old))
        self.deleted += 1

    def update(self, table: Table, rowid: int, new: Row) -> None:
        old = table.rows[rowid]
        new_pk = table.pk_of(new)
        if table.pk_col is not None and new_pk != table.pk_of(old) and new_pk in table.pk_index:
            col = table.tdef.primary_key
            raise DbError(
                400,
                f"Duplicate insertion of row violates unique constraint `{table.tdef.name}_{col}_key` "
                f"on column `{col}`: {format_value(new_pk)}",
            )
        self._raw_delete(table, rowid)
        self._raw_insert(table, rowid, new)
        self.ops.append(["upd", table.tdef.name, rowid, new])

        def undo() -> None:
            self._raw_delete(table, rowid)
            self._raw_insert(table, rowid, old)

        self._undo.append(undo)
        self.updated += 1

    @staticmethod
    def _raw_insert(table: Table, rowid: int, row: Row) -> None:
        table.rows[rowid] = row
        if table.pk_col is not None:
            table.pk_index[row[table.pk_col]] = rowid

    @staticmethod
    def _raw_delete(table: Table, rowid: int) -> None:
        row = table.rows.pop(rowid)
        if table.pk_col is not None:
            table.pk_index.pop(row[table.pk_col], None)

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.ops.clear()


# ---------------------------------------------------------------------------------------------
# the Pogly-shaped module (facts from PoglyApp/pogly-standalone `server/`, behaviour only)

SYSTEM_TABLES = [
    TableDef("st_client", 13, [("identity", "Identity"), ("connection_id", "ConnectionId")], public=False),
    TableDef(
        "st_connection_credentials",
        14,
        [("connection_id", "ConnectionId"), ("jwt_payload", "String")],
        public=False,
        primary_key="connection_id",
    ),
]

POGLY_TABLES = [
    TableDef(
        "Config",
        4096,
        [
            ("Version", "U32"), ("OwnerIdentity", "Identity"), ("StreamingPlatform", "String"),
            ("StreamName", "String"), ("DebugMode", "Bool"), ("UpdateHz", "U32"), ("EditorBorder", "U32"),
            ("Authentication", "Bool"), ("StrictMode", "Bool"), ("EditorGuidelines", "String"),
            ("ConfigInit", "Bool"),
        ],
        primary_key="Version",
    ),
    TableDef("Heartbeat", 4097, [("Id", "U32"), ("ServerIdentity", "Identity"), ("Tick", "I32")], primary_key="Id"),
    TableDef(
        "Guests",
        4098,
        [
            ("Address", "ConnectionId"), ("Identity", "Identity"), ("Nickname", "String"), ("Color", "String"),
            ("SelectedElementId", "U32"), ("SelectedLayoutId", "U32"), ("PositionX", "I32"),
            ("PositionY", "I32"), ("Authenticated", "Bool"),
        ],
        primary_key="Address",
    ),
    TableDef("Permissions", 4099, [("Identity", "Identity"), ("PermissionType", "U32")]),
    # test-only table, so durability tests can make many acknowledged writes quickly
    TableDef("Items", 4100, [("Id", "U64"), ("Value", "String")], primary_key="Id", autoinc="Id"),
]

LIFECYCLE_REDUCERS = {
    "init": "Init", "Init": "Init", "OnConnect": "OnConnect", "OnDisconnect": "OnDisconnect",
    "client_connected": "OnConnect", "client_disconnected": "OnDisconnect",
    "on_connect": "OnConnect", "on_disconnect": "OnDisconnect",
}

# reducer name -> (argument names, argument types); all test-only helpers except SetConfig
POGLY_REDUCERS: dict[str, list[tuple[str, str]]] = {
    "log_message": [("level", "String"), ("message", "String")],
    "insert_item": [("value", "String")],
    "fail": [("message", "String")],
    # Pogly's onboarding (server/Config/ConfigReducers.cs): while Config.ConfigInit is false the
    # caller becomes the owner; afterwards it throws.  (The real reducer also wants the caller's
    # Guests row and an auth key when authentication is on; not reproduced.)
    "SetConfig": [("platform", "String"), ("channel", "String"), ("debug", "Bool"), ("updateHz", "U32"),
                  ("editorBorder", "U32"), ("authentication", "Bool"), ("strictMode", "Bool"),
                  ("authKey", "String")],
}
_ARG_TYPES: dict[str, tuple[type, ...]] = {"String": (str,), "Bool": (bool,), "U32": (int,)}


def module_kind(program: bytes) -> str:
    return "pogly" if POGLY_MARKER in program else "plain"


# ---------------------------------------------------------------------------------------------
# databases


class Database:
    def __init__(self, store: Store, meta: dict[str, Any]) -> None:
        self.store = store
        self.identity: str = meta["identity"]
        self.owner: str = meta["owner"]
        self.replica_id: int = meta["replica_id"]
        self.host_type: str = meta["host_type"]
        self.program_hash: str = meta["program_hash"]
        self.initial_program: str = meta.get("initial_program", meta["program_hash"])
        self.kind: str = meta["kind"]
        self.names: list[str] = list(meta.get("names", []))
        self.tables: dict[str, Table] = {}
        self.loaded = False
        self.tx_offset = 0
        self.connections: dict[str, Any] = {}  # connection id -> websocket-ish object with .close()
        self.log_followers: set[asyncio.Queue[bytes | None]] = set()
        self._memory_logs: list[bytes] = []
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._log_path: str | None = None

    # -- paths ---------------------------------------------------------------------------------

    @property
    def replica_dir(self) -> str:
        return os.path.join(self.store.data_dir, "replicas", str(self.replica_id))

    @property
    def clog_path(self) -> str:
        return os.path.join(self.replica_dir, "clog", "00000000000000000000.stdb.log")

    def module_log_path(self) -> str:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return os.path.join(self.replica_dir, "module_logs", f"{day}.log")

    # -- lifecycle -----------------------------------------------------------------------------

    def _lock_replica(self) -> None:
        """Take ``replicas/<id>/db.lock`` (flock), like the real per-replica commitlog lock."""
        if self._lock_fd is not None:
            return
        os.makedirs(self.replica_dir, exist_ok=True)
        path = os.path.join(self.replica_dir, "db.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            raise DbError(500, f"Database is already opened. Path:`{path}`. Error:{err}") from None
        if self.store.version.at_least(1, 12):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.ftruncate(fd, 0)
            os.write(fd, f"pid={os.getpid()};timestamp_utc={stamp}".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._log_path = None
        for q in list(self.log_followers):
            q.put_nowait(None)

    def ensure_loaded(self) -> None:
        """Lazily replay the commitlog on first use (the real server launches modules lazily too)."""
        if self.loaded:
            return
        self.loaded = True
        self.tables = {}
        for tdef in SYSTEM_TABLES:
            self.tables[tdef.name] = Table(tdef)
        if self.store.durability.enabled:
            self._lock_replica()
            for rec in read_log_lines(self.clog_path):
                self._replay(rec)
        # connections that were open when the previous process died: disconnect them now
        st_client = self.tables["st_client"]
        stale = [list(r) for r in st_client.rows.values()]
        if stale:
            with self.transaction() as tx:
                for ident, conn in stale:
                    self.disconnect(tx, ident, conn)

    def _replay(self, rec: dict[str, Any]) -> None:
        self.tx_offset = max(self.tx_offset, int(rec.get("tx", 0)) + 1)
        for op in rec.get("ops", []):
            kind = op[0]
            if kind == "create":
                tdef = TableDef.from_json(op[1])
                self.tables[tdef.name] = Table(tdef)
                continue
            table = self.tables[op[1]]
            if kind == "ins":
                rowid, row = op[2], op[3]
                Tx._raw_insert(table, rowid, row)
                table.next_rowid = max(table.next_rowid, rowid + 1)
                if table.tdef.autoinc is not None:
                    v = row[table.tdef.col_index(table.tdef.autoinc)]
                    table.seq = max(table.seq, int(v) + 1)
            elif kind == "del":
                Tx._raw_delete(table, op[2])
            elif kind == "upd":
                Tx._raw_delete(table, op[2])
                Tx._raw_insert(table, op[2], op[3])

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        tx = Tx(self)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise
        if tx.ops:
            self.store.durability.append(
                self.clog_path, {"tx": self.tx_offset, "ts": now_micros(), "ops": tx.ops}
            )
            self.tx_offset += 1

    # -- module logs ---------------------------------------------------------------------------

    def module_log(
        self,
        level: str,
        message: str,
        *,
        function: str | None = "__spacetimedb__",
        target: str = "__spacetimedb__",
        filename: str | None = "__spacetimedb__",
        line_number: int | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "level": level,
            "ts": now_micros(),
            "target": target,
            "filename": filename,
            "line_number": line_number,
            "function": function,
            "message": message,
        }
        if level == "Panic":
            record["trace"] = []
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        if self.store.durability.enabled:
            path = self.module_log_path()
            if path != self._log_path:
                if self._log_fd is not None:
                    os.close(self._log_fd)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self._log_path = path
            assert self._log_fd is not None
            os.write(self._log_fd, line)
        else:
            self._memory_logs.append(line)
        for q in list(self.log_followers):
            q.put_nowait(line)

    def read_logs(self, num_lines: int | None) -> list[bytes]:
        if self.store.durability.enabled:
            try:
                with open(self.module_log_path(), "rb") as f:
                    lines = f.read().splitlines(keepends=True)
            except FileNotFoundError:
                lines = []
        else:
            lines = list(self._memory_logs)
        if num_lines is not None:
            lines = lines[-num_lines:] if num_lines > 0 else []
        return lines

    def pogly_log(self, level: str, message: str, function: str, line_number: int) -> None:
        self.module_log(
            level, message, function=function, target="pogly", filename="src/lib.rs", line_number=line_number
        )

    # -- module behaviour ----------------------------------------------------------------------

    def create_schema(self, tx: Tx) -> None:
        if self.kind != "pogly":
            return
        for tdef in POGLY_TABLES:
            if tdef.name not in self.tables:
                tx.create_table(tdef)

    def run_init(self, tx: Tx, sender: str) -> None:
        """Pogly's ``Init`` reducer, run on first publish with the publisher as sender."""
        if self.kind != "pogly":
            return
        tx.insert(
            self.tables["Config"],
            [0, sender, "twitch", "bobross", False, 120, 1000, False, False, "", False],
        )
        tx.insert(self.tables["Heartbeat"], [0, sender, 0])
        self.pogly_log("Info", "[Init] Server successfully started!", "init", 72)

    def connect(self, tx: Tx, identity: str, connection_id: str, jwt_payload: str) -> None:
        tx.insert(self.tables["st_client"], [identity, connection_id])
        tx.insert(self.tables["st_connection_credentials"], [connection_id, jwt_payload])
        if self.kind == "pogly":
            tx.insert(self.tables["Guests"], [connection_id, identity, "", "", 0, 0, 0, 0, False])
            self.pogly_log(
                "Info", f"[OnConnect] New guest connected {identity} at {connection_id}!", "on_connect", 95
            )

    def disconnect(self, tx: Tx, identity: str, connection_id: str) -> None:
        st_client = self.tables["st_client"]
        for rowid, row in list(st_client.rows.items()):
            if row[0] == identity and row[1] == connection_id:
                tx.delete(st_client, rowid)
        creds = self.tables["st_connection_credentials"]
        rid = creds.pk_index.get(connection_id)
        if rid is not None:
            tx.delete(creds, rid)
        if self.kind == "pogly" and "Guests" in self.tables:
            guests = self.tables["Guests"]
            rid = guests.pk_index.get(connection_id)
            if rid is not None:
                tx.delete(guests, rid)
            self.pogly_log(
                "Info", f"[OnDisconnect] Guest disconnected {identity} at {connection_id}!", "on_disconnect", 118
            )

    def reducers(self) -> dict[str, list[tuple[str, str]]]:
        return POGLY_REDUCERS if self.kind == "pogly" else {}

    def call_reducer(self, name: str, args: Any, caller: str) -> None:
        """Run a (test-only) reducer; raises DbError with the real statuses (404/400/530)."""
        if name in LIFECYCLE_REDUCERS:
            raise DbError(400, f"can't directly call special {LIFECYCLE_REDUCERS[name]} lifecycle reducer")
        params = self.reducers().get(name)
        if params is None:
            raise DbError(404, "no such reducer")
        if isinstance(args, dict):
            try:
                args = [args[p] for p, _ in params]
            except KeyError as err:
                raise DbError(400, f"invalid arguments for reducer {name}: missing field `{err.args[0]}`") from None
        if not isinstance(args, list) or len(args) != len(params):
            raise DbError(
                400, f"invalid arguments for reducer {name}: expected {len(params)} arguments, got {args!r}"
            )
        for (pname, ptype), value in zip(params, args, strict=True):
            wanted = _ARG_TYPES[ptype]
            if not isinstance(value, wanted) or (ptype == "U32" and isinstance(value, bool)):
                what = "a string" if ptype == "String" else f"of type {ptype}"
                raise DbError(400, f"invalid arguments for reducer {name}: `{pname}` must be {what}")
        if name == "log_message":
            level = args[0]
            if level not in LOG_LEVELS:
                raise DbError(400, f"invalid arguments for reducer {name}: unknown log level `{level}`")
            self.pogly_log(level, args[1], "log_message", 140)
        elif name == "insert_item":
            with self.transaction() as tx:
                tx.insert(self.tables["Items"], [0, args[0]])
        elif name == "fail":
            self.pogly_log("Error", args[0], "fail", 150)
            raise DbError(530, args[0])
        elif name == "SetConfig":
            self._set_config(args, caller)

    def _set_config(self, args: list[Any], caller: str) -> None:
        config = self.tables["Config"]
        rowid = config.pk_index[0]
        row = list(config.rows[rowid])
        cols = [c for c, _ in config.tdef.columns]
        if row[cols.index("ConfigInit")]:
            message = f"{caller} tried to initialize Config- but Config is already initialized!"
            self.pogly_log("Warn", message, "SetConfig", 61)
            raise DbError(530, message)
        platform, channel, debug, update_hz, border, authentication, strict, _key = args
        for col, value in (("StreamingPlatform", platform), ("StreamName", channel), ("OwnerIdentity", caller),
                           ("DebugMode", debug), ("UpdateHz", update_hz), ("EditorBorder", border),
                           ("Authentication", authentication), ("StrictMode", strict), ("ConfigInit", True)):
            row[cols.index(col)] = value
        with self.transaction() as tx:
            tx.update(config, rowid, row)
            tx.insert(self.tables["Permissions"], [caller, 9999])  # PermissionTypes.Owner
        self.pogly_log("Info", f"[SetConfig] Success with Globals => DebugMode:{debug}, StrictMode:{strict}, "
                               f"Authentication:{authentication}!", "SetConfig", 90)


class Store:
    """All databases of one data directory, plus the control data that names and owns them."""

    def __init__(self, data_dir: str, version: Version, *, in_memory: bool, flush_interval: float) -> None:
        self.data_dir = data_dir
        self.version = version
        self.durability = Durability(not in_memory, flush_interval)
        self.databases: dict[str, Database] = {}
        self.names: dict[str, str] = {}
        self.next_replica_id = 1
        self.control_path = os.path.join(data_dir, "control-db", "standin-control.jsonl")

    def load(self) -> None:
        if not self.durability.enabled:
            return
        for rec in read_log_lines(self.control_path):
            self._apply_control(rec)

    def _apply_control(self, rec: dict[str, Any]) -> None:
        op = rec["op"]
        if op == "create":
            db = Database(self, rec)
            self.databases[db.identity] = db
            for n in db.names:
                self.names[n] = db.identity
            self.next_replica_id = max(self.next_replica_id, db.replica_id + 1)
            return
        db = self.databases.get(rec["identity"])
        if db is None:
            return
        if op == "program":
            db.program_hash = rec["program_hash"]
            db.kind = rec["kind"]
        elif op == "reset":
            db.replica_id = rec["replica_id"]
            db.program_hash = rec["program_hash"]
            db.kind = rec["kind"]
            self.next_replica_id = max(self.next_replica_id, db.replica_id + 1)
        elif op == "names":
            for n in db.names:
                self.names.pop(n, None)
            db.names = list(rec["names"])
            for n in db.names:
                self.names[n] = db.identity
        elif op == "delete":
            self.databases.pop(db.identity, None)
            for n in db.names:
                self.names.pop(n, None)

    def _control(self, rec: dict[str, Any]) -> None:
        self.durability.append(self.control_path, rec)

    # -- lookups -------------------------------------------------------------------------------

    def resolve(self, name_or_identity: str) -> Database | None:
        ident = self.names.get(name_or_identity)
        if ident is None and len(name_or_identity) == 64:
            ident = name_or_identity.lower()
        return self.databases.get(ident) if ident else None

    def owned_by(self, identity: str) -> list[str]:
        return [d.identity for d in self.databases.values() if d.owner == identity]

    # -- program bytes -------------------------------------------------------------------------

    def save_program(self, program: bytes) -> str:
        digest = hashlib.sha256(program).hexdigest()
        if self.durability.enabled:
            path = os.path.join(self.data_dir, "program-bytes", digest[:2], digest[2:])
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(program)
                os.replace(tmp, path)
        return digest

    # -- database lifecycle --------------------------------------------------------------------

    def create_database(self, owner: str, name: str | None, host_type: str, program: bytes) -> Database:
        if FAIL_MARKER in program:
            raise DbError(
                500,
                "Database initialization failed: the module's init reducer panicked "
                "(standin:fail-publish marker in the module bytes)",
            )
        digest = self.save_program(program)
        ident = from_claims("standin-database", secrets.token_hex(16))  # random, c200-shaped
        meta = {
            "op": "create",
            "identity": ident,
            "owner": owner,
            "replica_id": self.next_replica_id,
            "host_type": host_type,
            "program_hash": digest,
            "initial_program": digest,
            "kind": module_kind(program),
            "names": [name] if name else [],
            "created_us": now_micros(),
        }
        self.next_replica_id += 1
        self._control(meta)
        db = Database(self, meta)
        self.databases[ident] = db
        if name:
            self.names[name] = ident
        self._initialise(db, owner)
        return db

    def _initialise(self, db: Database, sender: str) -> None:
        db.ensure_loaded()
        with db.transaction() as tx:
            for tdef in SYSTEM_TABLES:
                if tdef.name not in db.tables:
                    tx.create_table(tdef)
            db.create_schema(tx)
            db.run_init(tx, sender)

    def update_database(self, db: Database, program: bytes) -> None:
        if FAIL_MARKER in program:
            raise DbError(
                500,
                "Database update rejected: the new module failed to initialise "
                "(standin:fail-publish marker in the module bytes)",
            )
        db.ensure_loaded()
        digest = self.save_program(program)
        kind = module_kind(program)
        self._control({"op": "program", "identity": db.identity, "program_hash": digest, "kind": kind})
        db.program_hash = digest
        if kind == "pogly" and db.kind != "pogly":
            db.kind = kind
            with db.transaction() as tx:
                db.create_schema(tx)  # automigration adds the new tables, Init does not run
        db.kind = kind
        db.module_log("Info", "Database updated")

    def reset_database(self, db: Database, sender: str, program: bytes) -> None:
        """``clear=true``: wipe the data (fresh replica) and initialise again, same identity."""
        if FAIL_MARKER in program:
            raise DbError(500, "Database initialization failed: the module's init reducer panicked")
        digest = self.save_program(program)
        self._close_connections(db)
        db.release()
        db.replica_id = self.next_replica_id
        self.next_replica_id += 1
        db.program_hash = digest
        db.kind = module_kind(program)
        db.loaded = False
        self._control(
            {"op": "reset", "identity": db.identity, "replica_id": db.replica_id, "program_hash": digest,
             "kind": db.kind}
        )
        self._initialise(db, sender)

    def set_names(self, db: Database, names: list[str]) -> None:
        for n in db.names:
            self.names.pop(n, None)
        db.names = list(names)
        for n in names:
            self.names[n] = db.identity
        self._control({"op": "names", "identity": db.identity, "names": db.names})

    def delete_database(self, db: Database) -> None:
        self._close_connections(db)
        db.release()
        self.databases.pop(db.identity, None)
        for n in db.names:
            self.names.pop(n, None)
        self._control({"op": "delete", "identity": db.identity})

    @staticmethod
    def _close_connections(db: Database) -> None:
        for conn in list(db.connections.values()):
            conn.kick()
        db.connections.clear()
