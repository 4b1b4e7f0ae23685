#!/bin/sh
# The demo: import SmolLM2 from its GGUF, start the supervisor, stream an answer, stop cleanly.
set -eu
BIN=${BIN:-.venv/bin}
WORK=${LMX_DEMO_DIR:-.cache/demo}
. scripts/smollm2.sh
STATE="$WORK/state"
write_config "$WORK/demo.toml"

echo "== starting lmx-supervisor (logs: $STATE/logs/supervisor.log)"
"$BIN/lmx-supervisor" run --config "$WORK/demo.toml" --state-dir "$STATE" 2>"$WORK/supervisor.stderr" &
SUP=$!
trap 'kill -TERM $SUP 2>/dev/null || true' EXIT INT TERM
i=0
until [ -S "$STATE/control.sock" ]; do
  i=$((i + 1)); [ $i -le 100 ] || { echo "supervisor did not start:"; cat "$WORK/supervisor.stderr"; exit 1; }
  kill -0 $SUP 2>/dev/null || { echo "supervisor exited:"; cat "$WORK/supervisor.stderr"; exit 1; }
  sleep 0.1
done

echo "== waiting for smollm2 to pass its canary"
"$BIN/lmxctl" --state-dir "$STATE" load smollm2
"$BIN/lmxctl" --state-dir "$STATE" status
echo "== lmxctl generate smollm2 'What is the capital of France?' --chat"
"$BIN/lmxctl" --state-dir "$STATE" generate smollm2 "What is the capital of France?" --chat --max-tokens 32

echo "== stopping (SIGTERM: drain, stop workers, exit 0)"
kill -TERM $SUP
trap - EXIT INT TERM
wait $SUP && echo "== supervisor exited 0"
