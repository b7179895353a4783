"""Compress a Hugging Face model from Python: calibrate on text, remove half of the blocks'
projection weights, save, and load the result back.

    python examples/hf_api.py MODEL_DIR sentences.txt small.safetensors
"""

import sys

import mpocompress
from mpocompress import CompressionConfig, compress_, save
from mpocompress.io.data.calibration import calibration_batches

model_dir, text, out = sys.argv[1:4]
model = mpocompress.load(model_dir)  # the transformers model; its tokenizer goes with it
batches = calibration_batches(f"text:{text}", model)  # up to 512 lines of the file's 80 % training split
report = compress_(model, CompressionConfig(remove=0.5), calibration=batches)  # in place: the allocator sizes each layer
print("\n".join(report.notes))  # what the budget resolved to
save(model, out, arch=f"hf:{type(model).__name__}", force=True)
small = mpocompress.load(out)  # the same transformers class, its factorized layers swapped in
print(f"{sum(p.numel() for p in small.parameters()):,} parameters, {len(report.layers)} layers factorized")
