// Drives headless Debian Chromium through the Pogly web app stand-in (tests/browser/page) and the
// real provider's login form, and reports what the browser observably did.
//
// Invoked by tests/test_browser.py (after `npm ci --prefix tests/js`, which installs the pinned
// playwright-core; the browser is Debian's /usr/bin/chromium, so nothing is downloaded), and by hand
// against `make run`:
//
//   node tests/browser/drive.mjs --url http://127.0.0.1:PORT/ --login alice \
//        --screenshot test-artifacts/browser-claim.png [--password x] [--timeout-ms 60000] \
//        [--expect owner|anonymous] [--await-owner FILE]
//
// --expect owner (default): open the page → click "Sign in" → the provider's dev login form (any
// login/password; the login becomes `sub`) → consent if asked → back on /callback the page connects
// to SpacetimeDB with the id_token → wait until it shows body[data-state="owner"] → screenshot.
// --expect anonymous: the page must be in Mode 1 (no sign-in offered), connect anonymously and
// tell whose Pogly it is (body[data-ownership]).
// --await-owner FILE: after the first report, keep the page open until it shows "you are the owner"
// (someone else makes this visitor the owner meanwhile), then screenshot to FILE and report again.
//
// Prints a line `RESULT {json}` on stdout per report: what the page shows, the authorization request's
// parameters as the provider received them, whether discovery was fetched, which token went to
// /v1/identity/websocket-token (its claims, and whether it is the stored user's id_token), the
// WebSocket URL's shape (token redacted) and subprotocol, and where the user is stored.  No token
// is printed.  Exits 1 with a screenshot next to the requested one (`.failed.png`) and the page
// text on stderr otherwise.

import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';
import { parseArgs } from 'node:util';

// playwright-core lives in tests/js/node_modules (one lockfile for all Node test helpers).
const require = createRequire(new URL('../js/package.json', import.meta.url));
const { chromium } = require('playwright-core');

// Root on a closed network: no sandbox, nothing phoning home; a fresh --user-data-dir is passed by
// launchPersistentContext below.
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string' },
    login: { type: 'string' },
    password: { type: 'string', default: 'any-password' },
    screenshot: { type: 'string' },
    'timeout-ms': { type: 'string', default: '60000' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    expect: { type: 'string', default: 'owner' },
    'await-owner': { type: 'string' },
  },
  strict: true,
});
if (!opts.url || !opts.screenshot || !['owner', 'anonymous'].includes(opts.expect)
    || (opts.expect === 'owner' && !opts.login)) {
  process.stderr.write('usage: drive.mjs --url URL --screenshot FILE [--login LOGIN] [--expect owner|anonymous]\n');
  process.exit(2);
}
const timeout = Number(opts['timeout-ms']);
const appOrigin = new URL(opts.url).origin;

function claims(jwt) {
  try {
    const payload = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
    return { iss: payload.iss, sub: payload.sub, aud: payload.aud ?? null };
  } catch {
    return null;
  }
}

function quiet(promise) {
  return promise.catch(() => undefined);
}

const seen = {
  authorize: null, // the first authorization request's parameters
  discovery: [], // discovery documents fetched
  bearer: null, // the token sent to /v1/identity/websocket-token
  websocket: null, // the subscribe URL (token redacted)
  wsProtocol: null, // Sec-WebSocket-Protocol of that handshake
};

const profile = mkdtempSync(join(tmpdir(), 'pogly-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: opts.chromium, headless: true, args: CHROMIUM_ARGS, viewport: { width: 1100, height: 860 },
});
const page = context.pages()[0] ?? await context.newPage();
page.setDefaultTimeout(timeout);
page.on('console', (m) => process.stderr.write(`[console.${m.type()}] ${m.text()}\n`));
page.on('pageerror', (e) => process.stderr.write(`[pageerror] ${e.stack || e}\n`));
page.on('response', (r) => {
  if (r.status() >= 400) process.stderr.write(`[http ${r.status()}] ${r.request().method()} ${r.url()}\n`);
});
page.on('request', async (request) => {
  const url = new URL(request.url());
  if (url.pathname.endsWith('/.well-known/openid-configuration')) seen.discovery.push(url.href);
  if (!seen.authorize && url.origin !== appOrigin && url.searchParams.has('response_type')) {
    seen.authorize = Object.fromEntries(url.searchParams);
    seen.authorize.endpoint = `${url.origin}${url.pathname}`;
    for (const secret of ['state', 'nonce', 'code_challenge']) {
      if (secret in seen.authorize) seen.authorize[secret] = '(present)';
    }
  }
  if (url.origin === appOrigin && url.pathname === '/v1/identity/websocket-token' && request.method() === 'POST') {
    const auth = (await request.allHeaders()).authorization || '';
    seen.bearer = auth.startsWith('Bearer ') ? auth.slice('Bearer '.length) : null;
  }
});
page.on('websocket', (ws) => {
  const url = new URL(ws.url());
  const token = url.searchParams.get('token');
  if (token) url.searchParams.set('token', 'REDACTED');
  seen.websocket = { url: url.href, path: url.pathname, params: [...url.searchParams.keys()],
    compression: url.searchParams.get('compression'), tokenClaims: token ? claims(token) : null };
});
const cdp = await context.newCDPSession(page);
await cdp.send('Network.enable');
cdp.on('Network.webSocketWillSendHandshakeRequest', (e) => {
  const headers = Object.fromEntries(Object.entries(e.request.headers).map(([k, v]) => [k.toLowerCase(), v]));
  seen.wsProtocol = headers['sec-websocket-protocol'] ?? null;
});

async function signIn() {
  await page.locator('#signin').click();
  // The provider's development interaction: login form, then (first time) a consent form.
  await page.locator('input[name="login"]').fill(opts.login);
  await page.locator('input[name="password"]').fill(opts.password);
  await page.locator('button[type="submit"]').click();
  const where = await Promise.race([
    quiet(page.waitForURL((u) => u.origin === appOrigin).then(() => 'app')),
    quiet(page.locator('input[name="prompt"][value="consent"]').waitFor({ state: 'attached' }).then(() => 'consent')),
  ]);
  if (where === 'consent') {
    await page.locator('button[type="submit"]').click();
    await page.waitForURL((u) => u.origin === appOrigin);
  } else if (where !== 'app') {
    throw new Error('neither back at the app nor on the consent page');
  }
}

async function storedUsers() {
  return page.evaluate(() => {
    const find = (store) => Object.keys(store).filter((k) => k.startsWith('oidc.user:'))
      .map((k) => ({ key: k, idToken: JSON.parse(store.getItem(k)).id_token }));
    return { session: find(window.sessionStorage), local: find(window.localStorage),
      stdbToken: window.localStorage.getItem('stdb-token') !== null };
  });
}

async function report(screenshot) {
  await page.screenshot({ path: screenshot, fullPage: true });
  const text = async (id) => (await page.locator(`#${id}`).innerText()).trim();
  const users = await storedUsers();
  const stored = users.session[0] ?? users.local[0];
  const result = {
    state: await page.locator('body').getAttribute('data-state'),
    stateText: await text('state'),
    mode: await page.locator('body').getAttribute('data-mode'),
    ownership: await page.locator('body').getAttribute('data-ownership'),
    hint: await text('hint'),
    signInOffered: await page.locator('#signin').isVisible(),
    issuer: await text('issuer'),
    clientId: await text('client'),
    sub: await text('sub'),
    scope: await text('scope'),
    identity: await text('identity'),
    owner: await text('owner'),
    ownerPermission: await text('permission'),
    path: new URL(page.url()).pathname,
    authorize: seen.authorize,
    discovery: seen.discovery,
    websocketToken: seen.bearer ? { claims: claims(seen.bearer), isStoredIdToken: stored?.idToken === seen.bearer }
      : null,
    websocket: seen.websocket,
    wsProtocol: seen.wsProtocol,
    userStore: users.session.length ? 'sessionStorage' : users.local.length ? 'localStorage' : null,
    userKey: stored?.key ?? null,
    stdbTokenStored: users.stdbToken,
  };
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
}

async function waitForState(...states) {
  const css = [...states, 'error'].map((st) => `body[data-state="${st}"]`).join(', ');
  await page.locator(css).waitFor({ state: 'attached' });
  const state = await page.locator('body').getAttribute('data-state');
  if (!states.includes(state)) throw new Error(`page ended in state ${state}: ${await page.locator('#state').innerText()}`);
}

let code = 0;
try {
  await page.goto(opts.url);
  if (opts.expect === 'owner') {
    await signIn();
    await waitForState('owner');
  } else {
    await page.waitForFunction(() => document.body.dataset.ownership || document.body.dataset.state === 'error');
    await waitForState('connected', 'owner');
  }
  await report(opts.screenshot);
  if (opts['await-owner']) {
    // The caller makes this visitor the owner (e.g. `pogly-entrypoint owner set`); the page shows it.
    await waitForState('owner');
    await report(opts['await-owner']);
  }
} catch (err) {
  code = 1;
  process.stderr.write(`drive.mjs: ${err.stack || err}\n`);
  await quiet(page.screenshot({ path: `${opts.screenshot.replace(/\.png$/, '')}.failed.png`, fullPage: true }));
  process.stderr.write(`page url: ${page.url()}\npage text:\n${await quiet(page.locator('body').innerText())}\n`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(code);
