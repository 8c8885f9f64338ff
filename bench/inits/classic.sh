#!/bin/sh
# The classic container entrypoint (the shape of the seed image's script; our own words): SpacetimeDB
# in the background, poll it once a second, publish, write config.js, exec Caddy. As PID 1 the shell
# has no SIGTERM handler (the kernel drops the signal) until `exec` makes Caddy PID 1; nothing ever
# sends SpacetimeDB SIGINT, and nothing restarts it.
set -e
"$SPACETIME_BIN" start --data-dir "$POGLY_DATA_DIR" --jwt-key-dir "$POGLY_CONFIG_DIR" \
  --listen-addr "$POGLY_SPACETIME_ADDR" &
echo "waiting for SpacetimeDB..."
until curl -sf -o /dev/null "http://$POGLY_SPACETIME_ADDR/v1/ping"; do sleep 1; done
if [ ! -e "$POGLY_DATA_DIR/.bench-published" ]; then  # (the bench's restart scenario skips the publish)
  "$SPACETIME_BIN" --config-path "$POGLY_CONFIG_DIR/cli.toml" publish -s "http://$POGLY_SPACETIME_ADDR" -y \
    -b "$POGLY_MODULE_DIR/pogly.wasm" pogly
  touch "$POGLY_DATA_DIR/.bench-published"
fi
printf 'window.POGLY_RUNTIME_CONFIG = {"OIDC_ISSUER": "%s", "OIDC_CLIENT_ID": "%s"};\n' \
  "$OIDC_ISSUER" "$OIDC_CLIENT_ID" > "$POGLY_RUN_DIR/config.js"
exec "$CADDY_BIN" run --config "$BENCH_CADDYFILE" --adapter caddyfile
