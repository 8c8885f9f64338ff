// silent_redirect_uri's script (upstream src/Auth/silentOidcRenew.ts, 452de58): finish the renewal.
import { oidcSettings, runtimeOidc } from './oidc.js';

void new window.oidc.UserManager(oidcSettings(runtimeOidc())).signinSilentCallback();
