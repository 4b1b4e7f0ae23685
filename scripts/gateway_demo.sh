#!/bin/sh
# The gateway demo: SmolLM2 (imported from its GGUF as scripts/demo.sh does) behind lmx-supervisor,
# lmx-gateway in front, wait for /readyz, stream a chat answer with curl -N, stop both cleanly.
set -eu
BIN=${BIN:-.venv/bin}
WORK=${LMX_DEMO_DIR:-.cache/demo}
PORT=${LMX_GATEWAY_PORT:-0}   # 0: any free port (the gateway prints the one it got)
# LMX_DEMO_KEEP=1 keeps both running after the answer, until Ctrl-C, to try the curl line yourself.
. scripts/smollm2.sh
STATE="$WORK/gateway-state"
write_config "$WORK/gateway-demo.toml"

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
