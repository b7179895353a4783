"""Data without labels, for distillation and agreement: text (one sample per line, tokenized with
the model's tokenizer) and tensors files holding inputs `x` only.

Both serve batches as keyword arguments of the model: a `TokenSet` gives input_ids, attention_mask
(and token_type_ids), trimmed to the longest sequence of the batch; a `FeatureSet` gives {"x": ...},
which is passed positionally.

For a causal language model, text is packed as LLM tools do: the lines of a split are joined by
newlines into one token stream and cut into windows of exactly `max_length` tokens (the last,
shorter remainder is dropped unless it is all there is), so every sample is a full window of
running text and no token is padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpocompress.errors import MPOCompressError
from mpocompress.io.data.images import seeded_split
from mpocompress.io.data.tensor_file import read_tensor_file
from mpocompress.tensors import all_finite

TEXT_PREFIX = "text:"
MAX_TEXT_BYTES = 1 << 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 1 << 24  # per image: larger ones are refused before they are decoded


@dataclass
class TokenSet:
    """Tokenized text, padded to the longest sample (at most max_length tokens)."""

    name: str
    split: str
    inputs: dict[str, torch.Tensor]  # (N, L) each: input_ids, attention_mask, token_type_ids
    augment: bool = False
    packed: bool = False  # windows cut from one token stream (a causal LM's text), no padding

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu", generator: Any = None) -> dict[str, torch.Tensor]:
        mask = self.inputs["attention_mask"][idx]
        longest = max(int(mask.sum(1).max()), 1)
        return {k: v[idx, :longest].to(device) for k, v in self.inputs.items()}


@dataclass
class FeatureSet:
    """Inputs without labels, (N, ...) as the model takes them."""

    name: str
    split: str
    x: torch.Tensor
    augment: bool = False

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu", generator: Any = None) -> dict[str, torch.Tensor]:
        x = self.x[idx].to(device)
        return {"x": x.float() / 255.0 if x.dtype == torch.uint8 else x.float()}


def is_unlabelled(spec: str) -> bool:
    """Whether a --data value names data without labels: text:FILE, a folder of images, or a
    tensors file without y."""
    if spec.startswith(TEXT_PREFIX):
        return True
    path = Path(spec)
    if path.is_dir():
        return True
    if path.suffix.lower() in (".pt", ".pth", ".npz", ".safetensors") and path.is_file():
        keys = set(read_tensor_file(path))
        return "x" in keys and "y" not in keys and "y_train" not in keys
    return False


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (at most `limit`)."""
    if not path.is_file():
        raise MPOCompressError(f"text file {path} not found; give text:FILE with one sample per line")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise MPOCompressError(f"text file {path} is over {MAX_TEXT_BYTES >> 30} GB; give a smaller sample")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MPOCompressError(f"text file {path} is not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise MPOCompressError(
            f"text file {path} holds {len(lines)} non-empty line{'s' if len(lines) != 1 else ''}; give at least 2 samples, one per line"
        )
    return lines[:limit] if limit else lines


PACK_LINES = 512  # lines tokenized at a time when packing (the stream is built in pieces)


CHARS_PER_TOKEN = 64  # a line longer than max_length x this is cut before tokenizing (no token is longer)
PACK_CHARS = 1 << 20  # the stream is tokenized in pieces of at most about this many characters


def _pieces(lines: list[str]) -> Iterator[str]:
    """The lines joined by newlines, in pieces of PACK_LINES lines and at most about PACK_CHARS
    characters (a longer line is cut at a space, so a huge line never reaches the tokenizer whole)."""
    buf: list[str] = []
    size = 0
    for ln in lines:
        while len(ln) > PACK_CHARS:
            cut = ln.rfind(" ", 0, PACK_CHARS)
            cut = cut if cut > 0 else PACK_CHARS
            if buf:
                yield "\n".join(buf) + "\n"
                buf, size = [], 0
            yield ln[:cut]
            ln = ln[cut:]
        buf.append(ln)
        size += len(ln) + 1
        if len(buf) >= PACK_LINES or size >= PACK_CHARS:
            yield "\n".join(buf) + "\n"
            buf, size = [], 0
    if buf:
        yield "\n".join(buf) + "\n"


def pack_windows(lines: list[str], tokenizer: Any, window: int, windows: int | None = None) -> torch.Tensor:
    """The lines joined by newlines as one token stream (no special tokens), cut into windows of
    `window` tokens: (N, window) int64. The remainder after the last full window is dropped, unless
    the stream is shorter than one window (then it is the one sample). `windows`: only the first that
    many are wanted, so the stream is tokenized only until it holds them (the same windows as the
    whole stream's first: its pieces are tokenized one by one either way)."""
    ids: list[int] = []
    for text in _pieces(lines):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if windows is not None and len(ids) >= windows * window:
            ids = ids[: windows * window]
            break
    if len(ids) < 2:
        raise MPOCompressError(f"the text holds {len(ids)} token{'s' if len(ids) != 1 else ''}; give more text")
    n = len(ids) // window
    if n == 0:
        return torch.tensor([ids], dtype=torch.int64)
    return torch.tensor(ids[: n * window], dtype=torch.int64).view(n, window)


def load_unlabelled(
    spec: str, split: str, tokenizer: Any = None, max_length: int = 128, seed: int = 0, limit: int | None = None,
    pack: bool = False, first: int | None = None,
) -> TokenSet | FeatureSet:  # fmt: skip
    """One split (seeded 80/20 by line, of the whole file) of text:FILE (tokenized with `tokenizer`; with
    `pack`, as windows of `max_length` tokens of one stream, see `pack_windows`; `limit`: at most that
    many lines in all, the first of each split; `first`: only the split's first that many samples are
    wanted, windows or lines, so no more text is tokenized) or of a tensors file with x only."""
    if split not in ("train", "test"):
        raise MPOCompressError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise MPOCompressError(f"--max-length must be a whole number >= 2, got {max_length!r}")
    if spec.startswith(TEXT_PREFIX):
        path = Path(spec[len(TEXT_PREFIX) :])
        lines = read_lines(path)
        if tokenizer is None:
            raise MPOCompressError("text data needs the model's tokenizer, and this model has none; give a model with one")
        # the split is of the whole file, whatever `limit`: every command (calibrate, heal, evaluate) holds out the
        # same lines; `limit` then takes the first of each split's lines, 80 % of it from training, 20 % held out
        train_idx, test_idx = seeded_split(len(lines), seed)
        chosen_idx = (train_idx if split == "train" else test_idx).tolist()
        if limit:
            keep = max(1, round(0.8 * limit)) if split == "train" else max(1, limit - max(1, round(0.8 * limit)))
            chosen_idx = sorted(chosen_idx)[:keep]
        chosen = [lines[i] for i in (sorted(chosen_idx) if pack else chosen_idx)]  # a stream keeps the file's order
        if pack:
            ids = pack_windows(chosen, tokenizer, max_length, first)
            return TokenSet(path.name, split, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, packed=True)
        if getattr(tokenizer, "pad_token", "") is None:  # GPT-2 and relatives: padding is masked, any token serves
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
        # a line is cut before the tokenizer sees it: max_length tokens never need more than CHARS_PER_TOKEN each
        chosen = [ln[: max_length * CHARS_PER_TOKEN] for ln in chosen[:first]]  # padded to the longest of those wanted
        enc = tokenizer(chosen, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return TokenSet(path.name, split, inputs)
    path = Path(spec)
    if path.is_dir():
        x = read_image_folder(path, limit)
        train_idx, test_idx = seeded_split(x.shape[0], seed)
        return FeatureSet(path.name, split, x[train_idx if split == "train" else test_idx].contiguous())
    t = read_tensor_file(path)
    x = t.get("x")
    if x is None:
        raise MPOCompressError(f"dataset file {path} holds {', '.join(sorted(t)) or 'nothing'}; data without labels needs a tensor x")
    if x.ndim < 2 or x.shape[0] < 2:
        raise MPOCompressError(f"{path}: x must hold at least 2 samples, got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.dtype.is_floating_point) or not all_finite(x):
        raise MPOCompressError(f"{path}: x must be uint8 or floating point without NaN or Inf")
    x = x[:limit] if limit else x
    train_idx, test_idx = seeded_split(x.shape[0], seed)
    return FeatureSet(path.name, split, x[train_idx if split == "train" else test_idx].contiguous())


def read_image_folder(path: Path, limit: int | None = None) -> torch.Tensor:
    """The images of a folder (sorted by name; at most `limit`) as uint8 (N, C, H, W): one channel
    when every image is greyscale, else RGB. They must share one size."""
    try:
        from PIL import Image
    except ImportError:
        raise MPOCompressError("a folder of images needs Pillow: pip install -e '.[images]' (or pip install pillow)") from None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if len(files) < 2:
        raise MPOCompressError(f"folder {path} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); give at least 2")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise MPOCompressError(f"{f} is {img.width}x{img.height} pixels, over {MAX_IMAGE_PIXELS:,}; resize it")
                img.load()
                images.append(img.copy())
        except MPOCompressError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
            raise MPOCompressError(f"cannot read image {f} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); remove or repair it") from None
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise MPOCompressError(f"images in {path} differ in size ({w1}x{h1} and {w2}x{h2}); resize them to one size")
    grey = all(img.mode in ("L", "1", "I;16", "I", "F") for img in images)
    arrays = [np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8) for img in images]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()
