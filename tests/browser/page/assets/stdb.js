// How the Pogly web app reaches SpacetimeDB with a token, as the stand-in reproduces it.
//
// Upstream src/StDB/useStDB.tsx (Maikatura/pogly-standalone at 56bc5b4, last changed by 157714b)
// builds `DbConnection.builder().withUri(domain).withModuleName(module).withToken(token)` where the
// token is the signed-in user's `id_token` (trimmed) when OIDC is on, and the `stdb-token` kept in
// localStorage otherwise (empty on a first visit: anonymous); in Mode 1 it stores the token the
// server hands back under `stdb-token`. Its overlay default for the domain is the page's own origin
// (ws: or wss:), which is what this stand-in uses.
//
// The SDK is `spacetimedb` 1.7.0 (upstream's package-lock.json). Facts taken from its
// src/sdk/websocket_decompress_adapter.ts and src/sdk/db_connection_impl.ts, nothing copied:
//   1. with a token: POST <http(s) origin>/v1/identity/websocket-token, header
//      `Authorization: Bearer <token>`, no body; the JSON answer's `token` is a short-lived token;
//      a non-2xx answer fails with "Failed to verify token: <status text>";
//   2. WebSocket <ws(s) origin>/v1/database/<module>/subscribe?token=<short-lived>&compression=Gzip
//      (the builder's default compression; no token parameter when there is no token; the
//      connection_id the SDK puts on the base URL does not survive the relative URL), subprotocol
//      `v1.bsatn.spacetimedb`, binary frames;
//   3. every server frame starts with a compression byte: 0 none, 1 Brotli (refused), 2 gzip.
// The message layouts (BSATN, little-endian; Identity = u256, ConnectionId = u128) are those of
// the SDK's src/sdk/client_api/*_type.ts.
//
// One difference, on purpose: the SDK 1.7 subscribes with `SubscribeMulti`; this page sends the
// v1 protocol's plain `Subscribe` (which the real server also answers, with InitialSubscription),
// because the SpacetimeDB stand-in in tests/standin only implements that one. Neither message
// passes through anything of ours except Caddy's WebSocket proxy.

export const PROTOCOL = 'v1.bsatn.spacetimedb';

export function stdbOrigin() {
  return `${window.location.protocol === 'https:' ? 'wss:' : 'ws:'}//${window.location.host}`;
}

export async function websocketToken(base, token) {
  const url = new URL('v1/identity/websocket-token', base);
  url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
  const response = await fetch(url, { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw new Error(`Failed to verify token: ${response.statusText} (${response.status})`);
  return (await response.json()).token;
}

export async function openSubscribeSocket(domain, module, token) {
  const base = new URL(domain);
  const shortLived = token ? await websocketToken(base, token) : undefined;
  const url = new URL(`v1/database/${module}/subscribe`, base);
  if (shortLived) url.searchParams.set('token', shortLived);
  url.searchParams.set('compression', 'Gzip');
  const ws = new WebSocket(url.toString(), PROTOCOL);
  ws.binaryType = 'arraybuffer';
  return ws;
}

// -- BSATN -----------------------------------------------------------------------------------

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  get remaining() { return this.bytes.length - this.pos; }

  take(n) {
    if (this.pos + n > this.bytes.length) throw new Error('truncated BSATN message');
    const out = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  u8() { return this.take(1)[0]; }
  u16() { const v = this.view.getUint16(this.pos, true); this.take(2); return v; }
  u32() { const v = this.view.getUint32(this.pos, true); this.take(4); return v; }
  u64() { const v = this.view.getBigUint64(this.pos, true); this.take(8); return v; }
  byteArray() { return this.take(this.u32()); }
  string() { return new TextDecoder().decode(this.byteArray()); }
  optionU32() { return this.u8() === 0 ? this.u32() : null; } // Option: some = 0, none = 1

  // Identity (u256) and ConnectionId (u128) as the usual big-endian hex.
  hexLE(n) {
    return Array.from(this.take(n)).reverse().map((b) => b.toString(16).padStart(2, '0')).join('');
  }
}

class Writer {
  constructor() { this.parts = []; }
  u8(v) { this.parts.push(Uint8Array.of(v)); return this; }
  u32(v) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v, true); this.parts.push(b); return this; }
  string(s) { const b = new TextEncoder().encode(s); this.u32(b.length); this.parts.push(b); return this; }
  bytes() {
    const out = new Uint8Array(this.parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

async function gunzip(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function unwrapFrame(data) {
  const frame = new Uint8Array(data);
  if (frame[0] === 0) return frame.subarray(1);
  if (frame[0] === 2) return gunzip(frame.subarray(1));
  throw new Error(frame[0] === 1 ? 'Brotli-compressed frame (not supported, like the SDK)'
    : `unknown compression byte ${frame[0]}`);
}

function rowList(r) {
  // BsatnRowList { size_hint: FixedSize(u16) | RowOffsets(Vec<u64>), rows_data: Vec<u8> }
  const hint = r.u8();
  let offsets = null;
  let size = 0;
  if (hint === 0) size = r.u16();
  else if (hint === 1) offsets = Array.from({ length: r.u32() }, () => Number(r.u64()));
  else throw new Error(`unknown RowSizeHint ${hint}`);
  const data = r.byteArray();
  if (!offsets) {
    offsets = [];
    for (let at = 0; size > 0 && at < data.length; at += size) offsets.push(at);
  }
  return offsets.map((start, i) => data.subarray(start, i + 1 < offsets.length ? offsets[i + 1] : data.length));
}

async function databaseUpdate(r) {
  // DatabaseUpdate { tables: Vec<TableUpdate { table_id, table_name, num_rows, updates }> }
  const tables = [];
  for (let t = r.u32(); t > 0; t -= 1) {
    r.u32(); // table_id
    const name = r.string();
    r.u64(); // num_rows
    const inserts = [];
    const deletes = [];
    for (let u = r.u32(); u > 0; u -= 1) {
      const tag = r.u8(); // CompressableQueryUpdate: Uncompressed 0, Brotli 1, Gzip 2
      let q = r;
      if (tag === 2) q = new Reader(await gunzip(r.byteArray()));
      else if (tag !== 0) throw new Error('Brotli-compressed query update (not supported, like the SDK)');
      deletes.push(...rowList(q));
      inserts.push(...rowList(q));
    }
    tables.push({ name, inserts, deletes });
  }
  return tables;
}

// ServerMessage variants (in order): InitialSubscription 0, TransactionUpdate 1,
// TransactionUpdateLight 2, IdentityToken 3, OneOffQueryResponse 4, SubscribeApplied 5,
// UnsubscribeApplied 6, SubscriptionError 7, SubscribeMultiApplied 8, UnsubscribeMultiApplied 9.
export async function decodeServerMessage(data) {
  const r = new Reader(await unwrapFrame(data));
  const tag = r.u8();
  if (tag === 3) return { kind: 'IdentityToken', identity: r.hexLE(32), token: r.string(), connectionId: r.hexLE(16) };
  if (tag === 0) return { kind: 'InitialSubscription', tables: await databaseUpdate(r) };
  if (tag === 1) {
    const status = r.u8(); // UpdateStatus: Committed(DatabaseUpdate) 0, Failed(String) 1, OutOfEnergy 2
    if (status === 0) return { kind: 'TransactionUpdate', tables: await databaseUpdate(r) };
    return { kind: 'TransactionUpdate', tables: [], failed: status === 1 ? r.string() : 'out of energy' };
  }
  if (tag === 7) {
    r.u64();
    r.optionU32();
    r.optionU32();
    r.optionU32();
    return { kind: 'SubscriptionError', error: r.string() };
  }
  return { kind: `ServerMessage#${tag}` };
}

// ClientMessage::Subscribe (variant 1) { query_strings: Vec<String>, request_id: u32 }.
export function subscribeMessage(queries, requestId) {
  const w = new Writer().u8(1).u32(queries.length);
  for (const q of queries) w.string(q);
  return w.u32(requestId).bytes();
}

// Rows of the tables the page reads (upstream server/Config/ConfigTables.cs and
// server/Permissions/PermissionTables.cs): Config starts with Version u32, OwnerIdentity;
// Heartbeat starts with Id u32, ServerIdentity (the module's own identity, which Init also makes
// the owner: unclaimed while the two are equal); Permissions is Identity, PermissionType u32
// (Owner = 9999).
export function heartbeatRow(bytes) {
  const r = new Reader(bytes);
  return { id: r.u32(), server: r.hexLE(32) };
}

export function configRow(bytes) {
  const r = new Reader(bytes);
  return { version: r.u32(), owner: r.hexLE(32) };
}

export function permissionRow(bytes) {
  const r = new Reader(bytes);
  return { identity: r.hexLE(32), type: r.u32() };
}
