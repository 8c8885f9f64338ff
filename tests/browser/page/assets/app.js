// A stand-in for the Pogly web app: the parts pogly-entrypoint must get right, and nothing else.
// Used by tests/test_browser.py (driven by tests/browser/drive.mjs) and served by `make run`.
//
// The flow follows upstream (Maikatura/pogly-standalone at 56bc5b4; facts only, nothing copied):
//   - src/index.tsx (c201fff): the app is wrapped in react-oidc-context's AuthProvider only when
//     OIDC is on; otherwise it runs without any sign-in (Mode 1);
//   - react-oidc-context 3.3.0's AuthProvider: on load, a page whose URL carries code/error + state
//     completes the sign-in (UserManager.signinCallback, then onSigninCallback), otherwise the
//     stored user is loaded (UserManager.getUser); "authenticated" = a user that is not expired;
//   - src/App.tsx (936fd36) and src/Pages/Callback/Callback.tsx (c201fff): /callback is a route of
//     the SPA (Caddy's try_files serves index.html there); once authenticated it replaces the
//     location with /login, the app's main page ("/" redirects there too);
//   - src/Pages/Login/Login.tsx (157714b): with OIDC on, nothing connects until there is an
//     id_token; its "Sign In" button calls signinRedirect(); the id_token goes to useStDB;
//   - src/StDB/useStDB.tsx (157714b) and the SDK: see stdb.js; on connect it subscribes to
//     Heartbeat, Guests, Config and Permissions, and Config row 0 says who the owner is.
// The page then shows whether Config.OwnerIdentity is this connection's identity ("you are the
// owner"), still the module's own (Heartbeat.ServerIdentity: nobody owns it yet), or someone else's
// (body[data-ownership] = me | unclaimed | other). The stand-in SpacetimeDB sends no live updates, so the page subscribes again every
// second until it is the owner (against a real server a TransactionUpdate would bring the change).

import { hasAuthParams, oidcSettings, onSigninCallback, runtimeOidc } from './oidc.js';
import {
  configRow, decodeServerMessage, heartbeatRow, openSubscribeSocket, permissionRow, stdbOrigin, subscribeMessage,
} from './stdb.js';

const MODULE = 'pogly';
const QUERIES = ['SELECT * FROM Heartbeat', 'SELECT * FROM Guests', 'SELECT * FROM Config', 'SELECT * FROM Permissions'];
const OWNER_PERMISSION = 9999;
const el = (id) => document.getElementById(id);

function setState(state, text) {
  document.body.dataset.state = state;
  el('state').textContent = text;
}

function show(id, value) {
  el(id).textContent = value || '-';
}

// A line of help; `code` spans in backquotes are shown as code.
function hint(text) {
  el('hint').replaceChildren(...text.split('`').map((part, i) => {
    if (i % 2 === 0) return document.createTextNode(part);
    const code = document.createElement('code');
    code.textContent = part;
    return code;
  }));
}

function note(line) {
  el('log').textContent += `${new Date().toISOString().slice(11, 23)} ${line}\n`;
}

function connect(token, { anonymous }) {
  const me = { identity: '' };
  let owner = '';
  let server = '';
  let ownerPermission = false;
  let requestId = 0;
  let timer = null;

  const refresh = () => {
    show('owner', owner);
    show('permission', owner ? (ownerPermission ? 'yes (9999)' : 'no') : '');
    if (!me.identity || !owner || !server) return;
    const ownership = owner === me.identity ? 'me' : owner === server ? 'unclaimed' : 'other';
    document.body.dataset.ownership = ownership;
    if (ownership === 'me') {
      setState('owner', 'you are the owner');
      hint('');
      if (timer) clearInterval(timer);
      timer = null;
    } else if (ownership === 'unclaimed') {
      setState('connected', 'connected; nobody owns this Pogly yet');
      hint(anonymous
        ? `Mode 1 has no sign-in, so nobody claims it by signing in: \`pogly-entrypoint owner set --identity ${me.identity}\` makes you the owner.`
        : 'The entrypoint makes the first person who signs in at OIDC_ISSUER the owner; this page updates when it has.');
    } else {
      setState('connected', 'connected; someone else is the owner');
      hint('Someone signed in first and became the owner; `pogly-entrypoint owner show` says who.');
    }
  };

  // InitialSubscription: the whole current rows; TransactionUpdate (real server): the changes.
  const apply = (tables, initial) => {
    for (const table of tables) {
      if (table.name === 'Config') {
        for (const bytes of table.inserts) {
          const row = configRow(bytes);
          if (row.version === 0) owner = row.owner;
        }
      } else if (table.name === 'Heartbeat') {
        for (const bytes of table.inserts) server = heartbeatRow(bytes).server;
      } else if (table.name === 'Permissions') {
        const mine = table.inserts.map(permissionRow)
          .some((p) => p.identity === me.identity && p.type === OWNER_PERMISSION);
        ownerPermission = initial ? mine : ownerPermission || mine;
      }
    }
    refresh();
  };

  setState('connecting', 'connecting to SpacetimeDB');
  return openSubscribeSocket(stdbOrigin(), MODULE, token).then((ws) => {
    const subscribe = () => {
      if (ws.readyState !== WebSocket.OPEN) return;
      requestId += 1;
      ws.send(subscribeMessage(QUERIES, requestId));
    };
    ws.onmessage = (event) => decodeServerMessage(event.data).then((message) => {
      if (message.kind === 'IdentityToken') {
        me.identity = message.identity;
        show('identity', message.identity);
        show('connection', message.connectionId);
        if (anonymous) window.localStorage.setItem('stdb-token', message.token);
        note(`connected as ${message.identity.slice(0, 16)}…`);
        setState('connected', 'connected; reading Config');
        subscribe();
        timer = setInterval(subscribe, 1000);
      } else if (message.kind === 'InitialSubscription' || message.kind === 'TransactionUpdate') {
        apply(message.tables, message.kind === 'InitialSubscription');
      } else if (message.kind === 'SubscriptionError') {
        note(`subscription error: ${message.error}`);
      }
    }).catch(fail);
    ws.onclose = (event) => {
      if (timer) clearInterval(timer);
      if (document.body.dataset.state !== 'owner') setState('error', `the SpacetimeDB connection closed (${event.code})`);
      note(`websocket closed (${event.code})`);
    };
    ws.onerror = () => note('websocket error');
  });
}

async function oidcMode(cfg) {
  const manager = new window.oidc.UserManager(oidcSettings(cfg));
  const signIn = el('signin');
  signIn.onclick = () => {
    setState('signing-in', 'going to your sign-in page');
    manager.signinRedirect().catch(fail);
  };
  el('signout').onclick = () => manager.signoutRedirect().catch(fail);

  let user = null;
  if (hasAuthParams()) {
    user = await manager.signinCallback();
    onSigninCallback();
  }
  user = user || await manager.getUser();
  const authenticated = Boolean(user) && !user.expired;
  if (window.location.pathname === '/callback' && authenticated) {
    window.history.replaceState({}, document.title, '/login');
  }
  if (!authenticated) {
    signIn.hidden = false;
    setState('signed-out', 'signed out: click "Sign in"');
    return;
  }
  el('signout').hidden = false;
  show('sub', user.profile.sub);
  show('scope', user.scope);
  const idToken = typeof user.id_token === 'string' ? user.id_token.trim() : '';
  if (!idToken) throw new Error('signed in, but the provider sent no id_token');
  await connect(idToken, { anonymous: false });
}

async function main() {
  const cfg = runtimeOidc();
  document.body.dataset.mode = cfg.enabled ? 'oidc' : 'anonymous';
  show('mode', cfg.enabled ? 'Mode 2: sign-in through your OIDC provider'
    : 'Mode 1: OIDC off (both values empty), anonymous SpacetimeDB connection');
  show('issuer', cfg.issuer);
  show('client', cfg.clientId);
  if (cfg.enabled) {
    show('redirect', oidcSettings(cfg).redirect_uri);
    await oidcMode(cfg);
  } else {
    await connect(window.localStorage.getItem('stdb-token') || '', { anonymous: true });
  }
}

function fail(err) {
  setState('error', `error: ${err.message || err}`);
  note(err.stack || String(err));
}

main().catch(fail);
