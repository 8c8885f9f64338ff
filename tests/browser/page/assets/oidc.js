// Runtime config and sign-in settings of the Pogly web app, as the stand-in reproduces them.
//
// Follows upstream src/Auth/oidc.ts (Maikatura/pogly-standalone at 56bc5b4, the file as last changed
// by 30477e0; introduced by 372ac68 in the "self-host-rework" that PoglyApp merged as 027a980).
// Facts taken from it, nothing copied:
//   - the config object is window.POGLY_RUNTIME_CONFIG, written by /config.js, which index.html loads
//     before the bundle; only its OIDC_ISSUER and OIDC_CLIENT_ID keys are read;
//   - each value is `runtime ?? build-time ?? ""`, then trimmed: an empty string in config.js wins
//     over a build-time value (a `??`, not a `||`); this stand-in has no build-time values;
//   - OIDC is on only when both are non-empty; otherwise the app runs in "Mode 1" (anonymous
//     SpacetimeDB tokens, nobody signs in);
//   - the oidc-client-ts settings: authority = the issuer (so discovery at
//     <issuer>/.well-known/openid-configuration, no metadata block), client_id, redirect_uri
//     <origin>/callback, post_logout_redirect_uri <origin>/, silent_redirect_uri
//     <origin>/silent-oidc-renew.html, scope "openid profile email", response_type "code",
//     automaticSilentRenew true, users kept in sessionStorage; nothing else is set, so the
//     library's defaults apply (loadUserInfo false, response_mode query, PKCE S256);
//   - the origin has a trailing "." removed and the base path is "" for a site served at "/"
//     (the fix of 30477e0 for redirect URIs like https://host./callback).
//
// tests/test_browser.py checks that the keys read here are exactly the ones entrypoint/web/config_js.py
// writes, and that those are upstream's.

const BUILD_TIME = {}; // upstream: process.env.OIDC_* baked in by `vite build`; none in the stand-in

export function runtimeOidc() {
  const runtime = window.POGLY_RUNTIME_CONFIG || {};
  const issuer = (runtime.OIDC_ISSUER ?? BUILD_TIME.OIDC_ISSUER ?? '').trim();
  const clientId = (runtime.OIDC_CLIENT_ID ?? BUILD_TIME.OIDC_CLIENT_ID ?? '').trim();
  return { issuer, clientId, enabled: issuer.length > 0 && clientId.length > 0 };
}

export function oidcSettings({ issuer, clientId }) {
  const origin = window.location.origin.replace(/\.$/, '');
  const base = ''; // served at "/"
  return {
    authority: issuer,
    client_id: clientId,
    redirect_uri: `${origin}${base}/callback`,
    post_logout_redirect_uri: `${origin}${base}/`,
    silent_redirect_uri: `${origin}${base}/silent-oidc-renew.html`,
    scope: 'openid profile email',
    response_type: 'code',
    automaticSilentRenew: true,
    userStore: new window.oidc.WebStorageStateStore({ store: window.sessionStorage }),
  };
}

// react-oidc-context (the AuthProvider upstream's src/index.tsx wraps the app in) completes a
// sign-in on any page whose query (or fragment) has `code` or `error` together with `state`.
export function hasAuthParams(location = window.location) {
  for (const raw of [location.search, location.hash.replace('#', '?')]) {
    const params = new URLSearchParams(raw);
    if ((params.get('code') || params.get('error')) && params.get('state')) return true;
  }
  return false;
}

// Upstream's onSigninCallback: drop the code and state from the address bar.
export function onSigninCallback() {
  window.history.replaceState({}, document.title, window.location.pathname);
}
