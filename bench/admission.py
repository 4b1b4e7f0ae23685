"""What admission adds to a load: the integrity checks (headers, names, sizes; never whole weight
files) on SmolLM2 and on a 20-shard synthetic snapshot whose shards are sparse files of 10 GiB each
(200 GiB as the checks see it, next to nothing on disk), and with `checksums = true` the first
(hashing) and the cached re-admission of SmolLM2. Prints one JSON line and a table."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.admission import admit as admission  # noqa: E402

from supervisor import logs
from supervisor.config import ModelConfig  # noqa: E402
from supervisor.persistence.store import Store  # noqa: E402
from tests.snapshots import smollm2_gguf_path, write_tiny_llama  # noqa: E402

SHARDS = 20
SHARD_BYTES = 10 * 2**30
RUNS = 20


def sharded_sparse(dest: Path) -> Path:
    """A llama-shaped snapshot with 20 shards; each has a real header and a sparse data section."""
    write_tiny_llama(dest)
    (dest / "model.safetensors").unlink()
    weight_map = {}
    for i in range(SHARDS):
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors, offset = {}, 0
        per = SHARD_BYTES // 4
        for t in range(4):
            tname = f"model.layers.{i}.w{t}"
            tensors[tname] = {"dtype": "F16", "shape": [per // 2], "data_offsets": [offset, offset + per]}
            offset += per
            weight_map[tname] = name
        header = json.dumps(tensors).encode()
        header += b" " * (-len(header) % 8)
        with open(dest / name, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + offset)  # sparse: the size the header promises
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def timed(model: ModelConfig, store: Store, runs: int = RUNS) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        refusal = asyncio.run(admission.integrity(model, store))
        out.append(time.perf_counter() - t0)
        assert refusal is None, refusal
    return out


def main() -> None:
    from worker.gguf import import_gguf  # mlx, in this bench process only

    logs.configure(None, "warning")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store(root)
        smol = root / "smollm2"
        import_gguf(smollm2_gguf_path(), smol)
        big = sharded_sparse(root / "sharded")
        logical = sum(p.stat().st_size for p in big.glob("*.safetensors"))
        on_disk = sum(p.stat().st_blocks * 512 for p in big.glob("*.safetensors"))
        r_smol = timed(ModelConfig(id="smol", path=str(smol)), store)
        r_big = timed(ModelConfig(id="big", path=str(big)), store)
        hashed = ModelConfig(id="smol-sums", path=str(smol), checksums=True)
        first = timed(hashed, store, runs=1)[0]
        cached = timed(hashed, store)
        store.close()
    ms = lambda v: round(statistics.median(v) * 1e3, 2)  # noqa: E731
    result = {"bench": "admission", "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
              "smollm2_ms": ms(r_smol), "sharded_20_ms": ms(r_big), "sharded_logical_gib": round(logical / 2**30),
              "sharded_on_disk_kib": round(on_disk / 1024), "smollm2_checksums_first_ms": round(first * 1e3, 1),
              "smollm2_checksums_cached_ms": ms(cached)}
    print(json.dumps(result))
    print(f"{'admission integrity checks (median of 20)':<52}{'ms':>8}")
    print(f"{'SmolLM2-135M (one 98 MB shard)':<52}{result['smollm2_ms']:>8}")
    print(f"{'20 shards, ' + str(result['sharded_logical_gib']) + ' GiB as the checks see it':<52}"
          f"{result['sharded_20_ms']:>8}")
    print(f"{'SmolLM2, checksums = true, first admission (hashes)':<52}{result['smollm2_checksums_first_ms']:>8}")
    print(f"{'SmolLM2, checksums = true, unchanged files (cache)':<52}{result['smollm2_checksums_cached_ms']:>8}")


if __name__ == "__main__":
    main()
