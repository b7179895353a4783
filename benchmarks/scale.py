"""Streamed conversion at scale (issue 25): a Llama of TinyLlama's shape (22 blocks, hidden 2048, GQA
32/4 heads, MLP 5632, 1.1B parameters) with random weights stored in bf16 as sharded safetensors (no
such real model is offline; the values change neither memory nor time), compressed with
`convert --stream --remove R --shard-size 1GB` under a hard address-space cap; peak resident memory
against the float32 model's size, wall time per block, and time against depth.

    python benchmarks/scale.py                                 # 22 blocks at 50 %, cap 3 GB (about 20 minutes on 2 cores)
    python benchmarks/scale.py --depths 2,4 --blocks 0         # time against depth only (minutes)
    python benchmarks/scale.py --hidden 256 --mlp 1024 --heads 4 --kv-heads 2 --depths 4,16 --blocks 0   # a quick look

Each row is one `mpocompress convert --stream` in a fresh process whose address space is capped
(RLIMIT_AS, as `prlimit --as` sets it) at --cap-gb above the interpreter with mpocompress and
transformers imported and its threads started (threads reserve address space, not memory). Peak RSS
is the process's own high-water mark (VmHWM). The baseline measured in the same run is that warmed-up
interpreter's RSS: the share no change to the streaming removes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "shared" / "data" / "text" / "docstrings-en.txt"
VOCAB = 32000

RUNNER = r"""
import json, re, resource, sys, time
def vm(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
import torch, transformers, transformers.models.llama.modeling_llama, scipy.linalg, sklearn, tensorly, tokenizers
import mpocompress.cli, mpocompress.cli.convert
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[2])("start the tokenizer's threads")
a = torch.randn(512, 512, dtype=torch.float64); torch.linalg.eigh(a @ a.T); torch.linalg.svd(a); del a
base = vm("VmRSS")
cap = int(float(sys.argv[1]) * 2**30)
if cap > 0:
    resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + cap, resource.RLIM_INFINITY))
t0 = time.perf_counter()
try:
    code = mpocompress.cli.main(["convert", *sys.argv[2:]])
except SystemExit as e:
    code = e.code
sys.stderr.write("\nSCALE " + json.dumps({"code": code, "seconds": time.perf_counter() - t0, "base": base, "peak": vm("VmHWM")}) + "\n")
"""


def write_model(folder: Path, blocks: int, hidden: int, mlp: int, heads: int, kv_heads: int) -> int:
    """Random bf16 weights of a Llama of this shape, written shard by shard (about 1 GB a shard),
    with a byte-level tokenizer; returns the parameter count."""
    import transformers
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parent / "tests"))
    from lm_models import byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=256, pad_token_id=256,
                                   dtype="bfloat16", architectures=["LlamaForCausalLM"])  # fmt: skip
    cfg.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    for i in range(blocks):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    parts: list[list[str]] = [[]]
    size = 0
    for name, s in shapes.items():
        n = torch.Size(s).numel() * 2
        if size + n > 1 << 30 and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += n
    weight_map = {}
    for k, part in enumerate(parts):
        file = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        tensors = {}
        for name in part:
            s = shapes[name]
            # Gaussian at the usual init scales (1/sqrt(fan-in)); the values change neither memory nor time
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * (0.02 if "embed" in name or "lm_head" in name else s[1] ** -0.5)
            tensors[name] = t.to(torch.bfloat16)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(torch.Size(s).numel() for s in shapes.values())


def run(folder: Path, text: Path, args: argparse.Namespace, out: Path, cap_gb: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", RUNNER, str(cap_gb), str(folder), "--stream", "--calib", f"text:{text}",
           "--calib-samples", str(args.calib_samples), "--max-length", str(args.max_length), "--remove", str(args.remove),
           "--structure", "lowrank", "--offload", args.offload, "-o", str(out), "--force", "--json",
           *(["--shard-size", args.shard_size] if args.shard_size else [])]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("SCALE ")), None)
    if line is None:
        sys.exit(f"the run did not finish:\n{r.stderr[-3000:]}")
    got = json.loads(line[6:])
    if got["code"] not in (0, None):
        sys.exit(f"convert --stream failed (exit {got['code']}):\n{r.stderr[-3000:]}")
    got["report"] = json.loads(r.stdout)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=22, help="depth of the full-size row (0: none)")
    ap.add_argument("--depths", default="2,4", help="depths of the time-against-depth rows")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--remove", type=float, default=0.5)
    ap.add_argument("--cap-gb", type=float, default=3.0, help="address space allowed above the warmed-up interpreter")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--offload", default="cpu", choices=["cpu", "disk"])
    ap.add_argument("--shard-size", default="1GB", help="the output's shards (convert --shard-size); '' writes one file")
    ap.add_argument("--work", type=Path, default=None, help="folder for the models and outputs (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mpo-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    lines = TEXT.read_text(encoding="utf-8").splitlines()
    text.write_text("\n".join(lines[: 4 * args.calib_samples * args.max_length // 40]) + "\n")
    depths = [int(d) for d in args.depths.split(",") if d] + ([args.blocks] if args.blocks else [])
    rows = []
    for depth in depths:
        folder = work / f"llama-{depth}"
        if not (folder / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            n = write_model(folder, depth, args.hidden, args.mlp, args.heads, args.kv_heads)
            print(f"wrote {depth} blocks ({n / 1e9:.2f}B parameters) in {time.perf_counter() - t0:.0f} s", flush=True)
        params = _params(folder)
        out = work / (f"out-{depth}" if args.shard_size else f"out-{depth}.safetensors")
        got = run(folder, text, args, out, args.cap_gb)
        shards = len(list(out.glob("model-*-of-*.safetensors"))) if out.is_dir() else 1
        rep = got["report"]
        fp32 = params * 4
        rows.append({"blocks": depth, "params": params, "fp32_gb": fp32 / 2**30, "seconds": got["seconds"],
                     "per_block": got["seconds"] / depth, "peak_gb": got["peak"] / 2**30, "base_gb": got["base"] / 2**30,
                     "peak_over_fp32": got["peak"] / fp32, "after": rep["params_model_after"], "shards": shards})  # fmt: skip
        r = rows[-1]
        print(f"{depth} blocks: {r['seconds']:.0f} s ({r['per_block']:.1f} s a block), peak RSS {r['peak_gb']:.2f} GB "
              f"(baseline {r['base_gb']:.2f} GB) = {r['peak_over_fp32']:.2f} of the fp32 model's {r['fp32_gb']:.2f} GB; output in {shards} file(s)", flush=True)  # fmt: skip
    print()
    print(f"convert --stream --remove {args.remove} --structure lowrank, {args.calib_samples} windows of {args.max_length} tokens, "
          f"--offload {args.offload}, address space capped at {args.cap_gb} GB above the warmed-up interpreter, "
          f"output {'in shards of ' + args.shard_size if args.shard_size else 'one file'}")  # fmt: skip
    print("| blocks | parameters | fp32 size | wall time | per block | peak RSS | baseline RSS | peak / fp32 size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['params'] / 1e9:.3f}B | {r['fp32_gb']:.2f} GB | {r['seconds']:.0f} s | {r['per_block']:.1f} s | "
              f"{r['peak_gb']:.2f} GB | {r['base_gb']:.2f} GB | {r['peak_over_fp32']:.2f} |")  # fmt: skip
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (b["seconds"] - a["seconds"]) / (b["blocks"] - a["blocks"])
        print(f"\ntime against depth: {slope:.1f} s per added block between {a['blocks']} and {b['blocks']} blocks "
              f"(per block at {a['blocks']}: {a['per_block']:.1f} s; at {b['blocks']}: {b['per_block']:.1f} s; "
              f"ratio of the two {b['per_block'] / a['per_block']:.2f}, 1.00 for linear)")  # fmt: skip
        print(f"peak RSS {a['peak_gb']:.2f} GB at {a['blocks']} blocks, {b['peak_gb']:.2f} GB at {b['blocks']} "
              f"(ratio {b['peak_gb'] / a['peak_gb']:.2f}; the weights grew {b['params'] / a['params']:.1f}x)")  # fmt: skip
    print(f"median per block: {statistics.median(r['per_block'] for r in rows):.1f} s")


def _params(folder: Path) -> int:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    from mpocompress.io.tensor_files import SafetensorsSource

    source = SafetensorsSource(folder)
    return sum(torch.Size(source.entries[k][1]).numel() for k in index["weight_map"])


if __name__ == "__main__":
    main()
