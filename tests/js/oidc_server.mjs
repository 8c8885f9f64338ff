// A real OpenID Provider (panva `oidc-provider` 8.8.1) for tests and `make run`.
//
// Why a real provider: the entrypoint's discovery validator must agree with what
// an actual, certified OP publishes (issuer shapes, prefixed endpoints, JWKS), and
// a later browser test signs in through it with oidc-client-ts.  Everything is in
// memory and the signing keys are generated at every start: never use it for
// anything but local development and tests.
//
// Usage (after `npm ci --prefix tests/js`):
//
//   node tests/js/oidc_server.mjs [options]
//
//   --shape authentik|keycloak|root  shortcut for --prefix (default: authentik)
//                                    authentik → /application/o/pogly/  (issuer ends with "/")
//                                    keycloak  → /realms/pogly          (issuer without "/")
//                                    root      → /                      (issuer is the bare origin)
//   --prefix PATH                    mount path; a trailing "/" is kept in the issuer, exactly
//                                    like the real providers do (overrides --shape)
//   --host HOST                      listen address (default 127.0.0.1)
//   --port N                         listen port (default 0 = any free port)
//   --public-host HOST               host name put in the issuer (default: --host)
//   --client-id ID                   the public client's ID (default: pogly)
//   --app-origin ORIGIN              (repeatable) a Pogly origin such as http://127.0.0.1:8080:
//                                    registers ORIGIN/callback, ORIGIN/ and
//                                    ORIGIN/silent-oidc-renew.html as redirect URIs, ORIGIN/ as
//                                    post-logout redirect URI and allows CORS from ORIGIN
//                                    (default: http://127.0.0.1:8080 and http://localhost:8080)
//   --redirect-uri URI               (repeatable) an extra redirect URI (its origin gets CORS)
//   --cors-origin ORIGIN             (repeatable) an extra origin allowed to call the token and
//                                    userinfo endpoints from a browser
//   --keys rs256|es256|both          signing keys in the JWKS (default: rs256); es256 serves an
//                                    ES256-only JWKS and signs ID tokens with ES256
//
// Every option can also come from the environment, which is handier in a Makefile:
// OIDC_TEST_SHAPE, OIDC_TEST_PREFIX, OIDC_TEST_HOST, OIDC_TEST_PORT, OIDC_TEST_PUBLIC_HOST,
// OIDC_TEST_CLIENT_ID, OIDC_TEST_KEYS, and space-separated OIDC_TEST_APP_ORIGINS,
// OIDC_TEST_REDIRECT_URIS, OIDC_TEST_CORS_ORIGINS.  Command-line options win.
//
// Protocol with the caller: once listening, exactly one line `READY <issuer>` is printed on
// stdout (everything else goes to stderr), so a test can wait for that line instead of
// sleeping.  SIGTERM or SIGINT closes every connection and exits 0.
//
// Signing in: the client is public (`token_endpoint_auth_method: none`), code flow with PKCE
// S256 only; scopes `openid`, `profile` and `email`.  The provider's development login form
// accepts ANY login and ANY password; the login becomes the `sub` claim.  A consent page follows on first sign-in.

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import http from 'node:http';
import process from 'node:process';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const SHAPES = {
  authentik: '/application/o/pogly/',
  keycloak: '/realms/pogly',
  root: '/',
};

function fail(message) {
  process.stderr.write(`oidc_server: ${message}\n`);
  process.exit(2);
}

function words(value) {
  return (value || '').split(/\s+/).filter(Boolean);
}

function readOptions() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        shape: { type: 'string' },
        prefix: { type: 'string' },
        host: { type: 'string' },
        port: { type: 'string' },
        'public-host': { type: 'string' },
        'client-id': { type: 'string' },
        'app-origin': { type: 'string', multiple: true },
        'redirect-uri': { type: 'string', multiple: true },
        'cors-origin': { type: 'string', multiple: true },
        keys: { type: 'string' },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (err) {
    fail(err.message);
  }
  const env = process.env;
  const shape = parsed.shape ?? env.OIDC_TEST_SHAPE ?? 'authentik';
  if (!(shape in SHAPES)) fail(`--shape must be one of ${Object.keys(SHAPES).join(', ')}`);
  const prefix = parsed.prefix ?? env.OIDC_TEST_PREFIX ?? SHAPES[shape];
  if (!prefix.startsWith('/') || /[\s?#]/.test(prefix)) fail('--prefix must be a path starting with /');
  const port = Number(parsed.port ?? env.OIDC_TEST_PORT ?? '0');
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail('--port must be 0-65535');
  const keys = parsed.keys ?? env.OIDC_TEST_KEYS ?? 'rs256';
  if (!['rs256', 'es256', 'both'].includes(keys)) fail('--keys must be rs256, es256 or both');
  const host = parsed.host ?? env.OIDC_TEST_HOST ?? '127.0.0.1';
  const appOrigins = parsed['app-origin'] ?? words(env.OIDC_TEST_APP_ORIGINS);
  return {
    prefix,
    host,
    port,
    publicHost: parsed['public-host'] ?? env.OIDC_TEST_PUBLIC_HOST ?? host,
    clientId: parsed['client-id'] ?? env.OIDC_TEST_CLIENT_ID ?? 'pogly',
    appOrigins: appOrigins.length ? appOrigins : ['http://127.0.0.1:8080', 'http://localhost:8080'],
    redirectUris: parsed['redirect-uri'] ?? words(env.OIDC_TEST_REDIRECT_URIS),
    corsOrigins: parsed['cors-origin'] ?? words(env.OIDC_TEST_CORS_ORIGINS),
    keys,
  };
}

// Fresh keys per start: nothing secret is ever committed, and a test that caches a key
// across provider restarts fails loudly instead of passing by accident.
function signingKeys(which) {
  const out = [];
  if (which === 'rs256' || which === 'both') {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    out.push({ ...privateKey.export({ format: 'jwk' }), kid: `rs256-${randomUUID()}`, use: 'sig', alg: 'RS256' });
  }
  if (which === 'es256' || which === 'both') {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    out.push({ ...privateKey.export({ format: 'jwk' }), kid: `es256-${randomUUID()}`, use: 'sig', alg: 'ES256' });
  }
  return { keys: out };
}

function originOf(uri) {
  try {
    return new URL(uri).origin;
  } catch {
    return fail(`not a URL: ${uri}`);
  }
}

function providerConfig(opts) {
  const redirectUris = [
    ...opts.appOrigins.flatMap((o) => [`${o}/callback`, `${o}/`, `${o}/silent-oidc-renew.html`]),
    ...opts.redirectUris,
  ];
  const corsOrigins = new Set([
    ...opts.appOrigins.map(originOf),
    ...opts.redirectUris.map(originOf),
    ...opts.corsOrigins.map(originOf),
  ]);
  const idTokenAlg = opts.keys === 'es256' ? 'ES256' : 'RS256';
  return {
    clients: [{
      client_id: opts.clientId,
      application_type: 'web',
      token_endpoint_auth_method: 'none',
      response_types: ['code'],
      grant_types: ['authorization_code'],
      redirect_uris: [...new Set(redirectUris)],
      post_logout_redirect_uris: [...new Set(opts.appOrigins.map((o) => `${o}/`))],
      id_token_signed_response_alg: idTokenAlg,
    }],
    jwks: signingKeys(opts.keys),
    enabledJWA: {
      idTokenSigningAlgValues: opts.keys === 'es256' ? ['ES256'] : opts.keys === 'both' ? ['RS256', 'ES256'] : ['RS256'],
    },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    pkce: { methods: ['S256'], required: () => true },
    features: {
      devInteractions: { enabled: true },
    },
    clientBasedCORS: (ctx, origin) => corsOrigins.has(origin),
    // The Pogly web app asks for `openid profile email` (upstream src/Auth/oidc.ts), so all
    // three scopes exist here; a made-up address under the reserved .test domain.
    claims: { openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email', 'email_verified'] },
    findAccount: (ctx, sub) => ({
      accountId: sub,
      claims: () => ({ sub, name: sub, preferred_username: sub, email: `${sub}@example.test`, email_verified: false }),
    }),
  };
}

const opts = readOptions();
// "/realms/pogly" and "/application/o/pogly/" both mount at the path without its final "/";
// the issuer keeps whatever the operator would see at the real provider.
const mountPath = opts.prefix.replace(/\/+$/, '');
let handler = null;

const server = http.createServer((req, res) => {
  const url = req.url || '/';
  const inside = mountPath === '' || url === mountPath || url.startsWith(`${mountPath}/`)
    || url.startsWith(`${mountPath}?`);
  if (!handler || !inside) {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: 'not_found', error_description: `outside ${mountPath || '/'}` }));
    return;
  }
  // oidc-provider derives its mount point from originalUrl minus url (the documented way to
  // mount it under a path without Koa/Express), so every advertised endpoint carries it.
  req.originalUrl = url;
  const rest = url.slice(mountPath.length);
  req.url = rest.startsWith('/') ? rest : `/${rest}`;
  handler(req, res);
});

function shutdown() {
  server.closeAllConnections();
  server.close(() => process.exit(0));
  // A half-open socket must not keep the test waiting.
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(opts.port, opts.host, () => {
  const { port } = server.address();
  const hostPart = opts.publicHost.includes(':') ? `[${opts.publicHost}]` : opts.publicHost;
  const issuer = `http://${hostPart}:${port}${opts.prefix === '/' ? '' : opts.prefix}`;
  const provider = new Provider(issuer, providerConfig(opts));
  provider.on('server_error', (ctx, err) => process.stderr.write(`oidc_server: ${err.stack}\n`));
  handler = provider.callback();
  process.stdout.write(`READY ${issuer}\n`);
});
