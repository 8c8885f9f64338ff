// Test page for the browser end-to-end test (tests/test_browser.py, driven by tests/browser/drive.mjs).
//
// It does what Pogly's web app does, and nothing more:
//   1. reads window.POGLY_RUNTIME_CONFIG from /config.js (written by the entrypoint),
//   2. signs in with oidc-client-ts (code flow + PKCE, redirect_uri <origin>/callback, scope
//      "openid profile", user in localStorage, no userinfo: the settings of Pogly's src/index.tsx),
//   3. connects like the SpacetimeDB 1.7 TypeScript SDK: POST /v1/identity/websocket-token with the
//      id token as bearer, then the WebSocket /v1/database/pogly/subscribe?token=<that token>
//      with the v1.json.spacetimedb subprotocol,
//   4. keeps the connection open and re-subscribes to Config once a second, so the page itself
//      shows when the entrypoint has made this user the owner (body[data-state="owner"]).
'use strict';

const MODULE = 'pogly';
const PROTOCOL = 'v1.json.spacetimedb';
const el = (id) => document.getElementById(id);

function setState(state, text) {
  document.body.dataset.state = state;
  el('state').textContent = text || state;
}

function note(line) {
  el('log').textContent += `${new Date().toISOString()} ${line}\n`;
}

function hex(value) {
  // {"__identity__": "0x…"}, ["0x…"] or "0x…" → 64 lowercase hex digits
  let v = value;
  while (v && typeof v === 'object') v = Array.isArray(v) ? v[0] : Object.values(v)[0];
  if (typeof v !== 'string') return '';
  return v.replace(/^0x/i, '').toLowerCase().padStart(64, '0');
}

function userManager(cfg) {
  const origin = window.location.origin;
  return new oidc.UserManager({
    authority: cfg.oidcIssuer,
    client_id: cfg.oidcClientId,
    redirect_uri: `${origin}/callback`,
    post_logout_redirect_uri: `${origin}/`,
    silent_redirect_uri: `${origin}/silent-oidc-renew.html`,
    response_type: 'code',
    scope: 'openid profile',
    loadUserInfo: false,
    automaticSilentRenew: false,
    userStore: new oidc.WebStorageStateStore({ store: window.localStorage }),
  });
}

async function websocketToken(idToken) {
  const response = await fetch('/v1/identity/websocket-token', {
    method: 'POST',
    headers: { Authorization: `Bearer ${idToken}` },
  });
  if (!response.ok) {
    throw new Error(`Failed to verify token: ${response.status} ${await response.text()}`);
  }
  return (await response.json()).token;
}

function connect(token) {
  const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${window.location.host}/v1/database/${MODULE}/subscribe`
    + `?token=${encodeURIComponent(token)}&compression=None`;
  const ws = new WebSocket(url, PROTOCOL);
  let me = '';
  let requestId = 0;
  const subscribe = () => {
    if (ws.readyState === WebSocket.OPEN) {
      requestId += 1;
      ws.send(JSON.stringify({ Subscribe: { query_strings: ['SELECT * FROM Config'], request_id: requestId } }));
    }
  };
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.IdentityToken) {
      me = hex(message.IdentityToken.identity);
      el('identity').textContent = me;
      el('connection').textContent = hex(message.IdentityToken.connection_id).slice(32);
      setState('connected', 'connected, waiting for the owner to be set');
      note('connected');
      subscribe();
      setInterval(subscribe, 1000);
    } else if (message.InitialSubscription) {
      for (const table of message.InitialSubscription.database_update.tables) {
        if (table.table_name !== 'Config') continue;
        for (const update of table.updates) {
          for (const raw of update.inserts) {
            const row = typeof raw === 'string' ? JSON.parse(raw) : raw;
            const owner = hex(Array.isArray(row) ? row[1] : row.OwnerIdentity);
            el('owner').textContent = owner;
            if (owner && owner === me && document.body.dataset.state !== 'owner') {
              setState('owner', 'you are the owner');
              note('owner is me');
            }
          }
        }
      }
    } else if (message.SubscriptionError) {
      note(`subscription error: ${message.SubscriptionError.error}`);
    }
  };
  ws.onclose = (event) => {
    if (document.body.dataset.state !== 'owner') setState('error', `websocket closed (${event.code})`);
    note(`websocket closed ${event.code}`);
  };
  ws.onerror = () => note('websocket error');
}

async function main() {
  const cfg = window.POGLY_RUNTIME_CONFIG;
  if (!cfg || !cfg.oidcIssuer) throw new Error('window.POGLY_RUNTIME_CONFIG is missing: /config.js not loaded');
  el('issuer').textContent = cfg.oidcIssuer;
  const manager = userManager(cfg);
  let user;
  if (window.location.pathname === '/callback') {
    user = await manager.signinRedirectCallback();
    window.history.replaceState({}, '', '/');
  } else {
    user = await manager.getUser();
  }
  if (!user || user.expired) {
    setState('signed-out', 'signed out');
    const button = el('signin');
    button.hidden = false;
    button.onclick = () => manager.signinRedirect();
    return;
  }
  el('sub').textContent = user.profile.sub;
  setState('signed-in', 'signed in, connecting');
  connect(await websocketToken(user.id_token));
}

main().catch((err) => {
  setState('error', `error: ${err.message}`);
  note(err.stack || String(err));
});
