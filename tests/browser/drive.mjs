// Drives headless Debian Chromium through the test page and the real provider's login form.
//
// Invoked by tests/test_browser.py (after `npm ci --prefix tests/js`, which installs the pinned
// playwright-core; the browser is Debian's /usr/bin/chromium, so nothing is downloaded):
//
//   node tests/browser/drive.mjs --url http://127.0.0.1:PORT/ --login alice \
//        --screenshot test-artifacts/browser-claim.png [--password x] [--timeout-ms 60000]
//
// Steps: open the page → click "Sign in" → the provider's dev login form (any login/password; the
// login becomes `sub`) → consent if asked → back on /callback the page connects to SpacetimeDB the
// way the SDK does → wait until the page shows body[data-state="owner"] → screenshot.
// Prints one line `RESULT {json}` on stdout (identity, owner, sub as the page shows them); exits 1
// with a screenshot next to the requested one (`.failed.png`) and the page text on stderr otherwise.

import { createRequire } from 'node:module';
import process from 'node:process';
import { parseArgs } from 'node:util';

// playwright-core lives in tests/js/node_modules (one lockfile for all Node test helpers).
const require = createRequire(new URL('../js/package.json', import.meta.url));
const { chromium } = require('playwright-core');

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
  },
  strict: true,
});
if (!opts.url || !opts.login || !opts.screenshot) {
  process.stderr.write('usage: drive.mjs --url URL --login LOGIN --screenshot FILE\n');
  process.exit(2);
}
const timeout = Number(opts['timeout-ms']);
const appOrigin = new URL(opts.url).origin;

const browser = await chromium.launch({ executablePath: opts.chromium, headless: true, args: CHROMIUM_ARGS });
const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
const page = await context.newPage();
page.setDefaultTimeout(timeout);
page.on('console', (m) => process.stderr.write(`[console.${m.type()}] ${m.text()}\n`));
page.on('pageerror', (e) => process.stderr.write(`[pageerror] ${e.stack || e}\n`));
page.on('response', (r) => {
  if (r.status() >= 400) process.stderr.write(`[http ${r.status()}] ${r.request().method()} ${r.url()}\n`);
});

function quiet(promise) {
  return promise.catch(() => undefined);
}

let code = 0;
try {
  await page.goto(opts.url);
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

  // Back on the app: it completes /callback, connects, and re-reads Config until it owns it.
  await page.locator('body[data-state="owner"], body[data-state="error"]').waitFor({ state: 'attached' });
  const state = await page.locator('body').getAttribute('data-state');
  if (state !== 'owner') throw new Error(`page ended in state ${state}: ${await page.locator('#state').innerText()}`);
  await page.screenshot({ path: opts.screenshot, fullPage: true });
  const text = async (id) => (await page.locator(`#${id}`).innerText()).trim();
  const result = {
    sub: await text('sub'),
    identity: await text('identity'),
    owner: await text('owner'),
    issuer: await text('issuer'),
    url: page.url(),
  };
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
} catch (err) {
  code = 1;
  process.stderr.write(`drive.mjs: ${err.stack || err}\n`);
  await quiet(page.screenshot({ path: opts.screenshot.replace(/\.png$/, '') + '.failed.png', fullPage: true }));
  process.stderr.write(`page url: ${page.url()}\npage text:\n${await quiet(page.locator('body').innerText())}\n`);
} finally {
  await browser.close();
}
process.exit(code);
