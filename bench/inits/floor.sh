#!/bin/bash
# The floor (not a product): the least a PID 1 must do. Both children at once, TERM → Caddy TERM +
# SpacetimeDB SIGINT (it flushes on SIGINT only), publish once (a stamp on the data volume).
D=$POGLY_DATA_DIR C=$POGLY_CONFIG_DIR A=$POGLY_SPACETIME_ADDR
"$SPACETIME_BIN" start --data-dir "$D" --jwt-key-dir "$C" --listen-addr "$A" & db=$!
"$CADDY_BIN" run --config "$BENCH_CADDYFILE" --adapter caddyfile & web=$!
trap 'kill -TERM $web; kill -INT $db; wait $web $db; exit 0' TERM
[ -e "$D/.bench-published" ] || { until curl -sfo /dev/null "http://$A/v1/ping"; do sleep 0.01; done
  "$SPACETIME_BIN" --config-path "$C/cli.toml" publish -s "http://$A" -y -b "$POGLY_MODULE_DIR/pogly.wasm" pogly \
    >/dev/null && touch "$D/.bench-published"; }
wait
