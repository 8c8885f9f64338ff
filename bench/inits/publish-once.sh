#!/bin/sh
# supervisord's one-shot [program:publish]: wait for SpacetimeDB (every 100 ms, at most 60 s),
# publish once, write config.js, exit.  Nothing in supervisord waits for it.
i=0
until curl -sf -o /dev/null "http://$POGLY_SPACETIME_ADDR/v1/ping"; do
  i=$((i + 1)); [ "$i" -lt 600 ] || exit 69; sleep 0.1
done
if [ ! -e "$POGLY_DATA_DIR/.bench-published" ]; then
  "$SPACETIME_BIN" --config-path "$POGLY_CONFIG_DIR/cli.toml" publish -s "http://$POGLY_SPACETIME_ADDR" -y \
    -b "$POGLY_MODULE_DIR/pogly.wasm" pogly || exit 1
  touch "$POGLY_DATA_DIR/.bench-published"
fi
printf 'window.POGLY_RUNTIME_CONFIG = {"OIDC_ISSUER": "%s", "OIDC_CLIENT_ID": "%s"};\n' \
  "$OIDC_ISSUER" "$OIDC_CLIENT_ID" > "$POGLY_RUN_DIR/config.js"
