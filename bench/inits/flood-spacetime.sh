#!/bin/sh
# SPACETIME_BIN for the log-relay scenario: `start` first prints a burst of BENCH_FLOOD_LINES lines
# between two markers, then becomes the stand-in (same PID); every other command is the stand-in.
if [ "$1" = start ] || [ "$3" = start ]; then
  echo "BENCH-FLOOD-BEGIN"
  seq -f "flood line %06.0f: the quick brown fox jumps over the lazy dog, 0123456789" 1 "${BENCH_FLOOD_LINES:-200000}"
  echo "BENCH-FLOOD-END"
fi
exec "$BENCH_STANDIN" "$@"
