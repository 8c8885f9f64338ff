"""The few WebSocket messages the stand-in speaks, in the ``v1.json`` and ``v1.bsatn`` protocols.

Layouts follow the public v1 protocol facts: server messages are an enum whose variants are, in
order, InitialSubscription(0), TransactionUpdate(1), TransactionUpdateLight(2), IdentityToken(3),
…; binary frames start with a compression tag (0 = none, which is all we send).  BSATN is
little-endian; Identity is a u256 and ConnectionId a u128, so their big-endian hex is reversed.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .engine import Row, Table


class Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> Writer:
        self.buf += struct.pack("<B", v)
        return self

    def u32(self, v: int) -> Writer:
        self.buf += struct.pack("<I", v)
        return self

    def i32(self, v: int) -> Writer:
        self.buf += struct.pack("<i", v)
        return self

    def u64(self, v: int) -> Writer:
        self.buf += struct.pack("<Q", v)
        return self

    def i64(self, v: int) -> Writer:
        self.buf += struct.pack("<q", v)
        return self

    def raw(self, b: bytes) -> Writer:
        self.buf += b
        return self

    def bytes_(self, b: bytes) -> Writer:
        return self.u32(len(b)).raw(b)

    def string(self, s: str) -> Writer:
        return self.bytes_(s.encode())

    def hex_le(self, hex_be: str) -> Writer:
        return self.raw(bytes.fromhex(hex_be)[::-1])


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated BSATN message")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def bytes_(self) -> bytes:
        return self.take(self.u32())

    def string(self) -> str:
        return self.bytes_().decode()


def encode_row(table: Table, row: Row) -> bytes:
    w = Writer()
    for (_, ty), value in zip(table.tdef.columns, row, strict=True):
        if ty == "U32":
            w.u32(value)
        elif ty == "U64":
            w.u64(value)
        elif ty == "I32":
            w.i32(value)
        elif ty == "Bool":
            w.u8(1 if value else 0)
        elif ty == "String":
            w.string(value)
        else:  # Identity / ConnectionId
            w.hex_le(value)
    return bytes(w.buf)


def json_row(table: Table, row: Row) -> str:
    out: list[Any] = []
    for (_, ty), value in zip(table.tdef.columns, row, strict=True):
        out.append([f"0x{value}"] if ty in ("Identity", "ConnectionId") else value)
    return json.dumps(out, separators=(",", ":"))


# -- server messages ---------------------------------------------------------------------------


def identity_token(binary: bool, identity: str, token: str, connection_id: str) -> bytes | str:
    if binary:
        return bytes(Writer().u8(0).u8(3).hex_le(identity).string(token).hex_le(connection_id).buf)
    return json.dumps(
        {
            "IdentityToken": {
                "identity": {"__identity__": f"0x{identity}"},
                "token": token,
                "connection_id": {"__connection_id__": f"0x{connection_id}"},
            }
        },
        separators=(",", ":"),
    )


def _database_update_bsatn(w: Writer, tables: list[tuple[Table, list[Row]]]) -> None:
    w.u32(len(tables))
    for table, rows in tables:
        encoded = [encode_row(table, r) for r in rows]
        w.u32(table.tdef.table_id).string(table.tdef.name).u64(len(rows))
        w.u32(1).u8(0)  # one update, Uncompressed
        for chunk in ([], encoded):  # deletes, inserts
            w.u8(1).u32(len(chunk))  # RowSizeHint::RowOffsets
            off = 0
            for data in chunk:
                w.u64(off)
                off += len(data)
            w.bytes_(b"".join(chunk))


def _database_update_json(tables: list[tuple[Table, list[Row]]]) -> dict[str, Any]:
    return {
        "tables": [
            {
                "table_id": t.tdef.table_id,
                "table_name": t.tdef.name,
                "num_rows": len(rows),
                "updates": [{"deletes": [], "inserts": [json_row(t, r) for r in rows]}],
            }
            for t, rows in tables
        ]
    }


def initial_subscription(binary: bool, request_id: int, tables: list[tuple[Table, list[Row]]],
                         micros: int) -> bytes | str:
    if binary:
        w = Writer().u8(0).u8(0)
        _database_update_bsatn(w, tables)
        w.u32(request_id).i64(micros)
        return bytes(w.buf)
    return json.dumps(
        {
            "InitialSubscription": {
                "database_update": _database_update_json(tables),
                "request_id": request_id,
                "total_host_execution_duration": {"__time_duration_micros__": micros},
            }
        },
        separators=(",", ":"),
    )


def transaction_update(
    binary: bool,
    *,
    error: str | None,
    timestamp_us: int,
    caller: str,
    connection_id: str,
    reducer: str,
    args: bytes | str,
    request_id: int,
    micros: int,
) -> bytes | str:
    """The caller's own TransactionUpdate (no table rows: live updates are not modelled)."""
    if binary:
        w = Writer().u8(0).u8(1)
        if error is None:
            w.u8(0).u32(0)  # Committed(DatabaseUpdate { tables: [] })
        else:
            w.u8(1).string(error)
        w.i64(timestamp_us).hex_le(caller).hex_le(connection_id)
        w.string(reducer).u32(0).bytes_(args if isinstance(args, bytes) else args.encode()).u32(request_id)
        w.raw(b"\x00" * 16).i64(micros)  # energy_quanta_used: u128
        return bytes(w.buf)
    status: dict[str, Any] = {"Committed": {"tables": []}} if error is None else {"Failed": error}
    return json.dumps(
        {
            "TransactionUpdate": {
                "status": status,
                "timestamp": {"__timestamp_micros_since_unix_epoch__": timestamp_us},
                "caller_identity": {"__identity__": f"0x{caller}"},
                "caller_connection_id": {"__connection_id__": f"0x{connection_id}"},
                "reducer_call": {
                    "reducer_name": reducer,
                    "reducer_id": 0,
                    "args": args if isinstance(args, str) else args.decode(errors="replace"),
                    "request_id": request_id,
                },
                "energy_quanta_used": {"quanta": 0},
                "total_host_execution_duration": {"__time_duration_micros__": micros},
            }
        },
        separators=(",", ":"),
    )


# -- client messages ---------------------------------------------------------------------------


def decode_client_message(data: bytes | str) -> tuple[str, dict[str, Any]]:
    """Return ``(variant, fields)`` for CallReducer / Subscribe / OneOffQuery; other variants by name."""
    if isinstance(data, str):
        msg = json.loads(data)
        if not isinstance(msg, dict) or len(msg) != 1:
            raise ValueError("expected a single-variant JSON object")
        ((variant, fields),) = msg.items()
        return str(variant), fields if isinstance(fields, dict) else {}
    r = Reader(data)
    tag = r.u8()
    if tag == 0:
        return "CallReducer", {"reducer": r.string(), "args": r.bytes_(), "request_id": r.u32(), "flags": r.u8()}
    if tag == 1:
        queries = [r.string() for _ in range(r.u32())]
        return "Subscribe", {"query_strings": queries, "request_id": r.u32()}
    names = ["CallReducer", "Subscribe", "OneOffQuery", "SubscribeSingle", "SubscribeMulti", "Unsubscribe",
             "UnsubscribeMulti", "CallProcedure"]
    return (names[tag] if tag < len(names) else f"Unknown({tag})"), {}


def decode_bsatn_string_args(data: bytes, count: int) -> list[str]:
    r = Reader(data)
    return [r.string() for _ in range(count)]
