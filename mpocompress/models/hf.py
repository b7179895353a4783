"""Hugging Face transformers models as architectures: `hf:CLASS` specs, building a model from its
config (offline, never with remote code), and what a saved file records about it.

transformers is an optional dependency (`pip install -e ".[hf]"`): it is imported only when a
Hugging Face model is asked for, and its absence is a one-line error naming the extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.utils import bounded_json

HF_PREFIX = "hf:"
INSTALL_HINT = "install the Hugging Face extra: pip install -e '.[hf]' (or pip install transformers)"


def transformers_module(what: str = "a Hugging Face model") -> Any:
    """The transformers package, or a one-line error saying which extra to install."""
    try:
        import transformers
    except ImportError:
        raise MPOCompressError(f"{what} needs the transformers package; {INSTALL_HINT}") from None
    return transformers


def hf_arch(model: nn.Module) -> str:
    """The architecture spec of a transformers model: hf:CLASS."""
    return HF_PREFIX + type(model).__name__


def hf_config_json(model: nn.Module) -> str:
    """The model's config as the JSON that `build_hf` takes back."""
    return model.config.to_json_string(use_diff=False)


def check_config(config: Any, source: str) -> dict[str, Any]:
    """A config.json's content checked before anything is built from it: a JSON object whose
    model_type transformers knows, asking for no remote code."""
    if not isinstance(config, Mapping):
        raise MPOCompressError(f"{source}: config.json must hold a JSON object; the folder is damaged")
    if "auto_map" in config or config.get("trust_remote_code"):
        raise MPOCompressError(
            f"{source}: config.json asks for custom code from the model's repository (auto_map); mpocompress never "
            "runs code that comes with a model: use a model whose type transformers knows"
        )
    model_type = config.get("model_type")
    transformers = transformers_module(f"{source} (a Hugging Face model folder)")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise MPOCompressError(
            f"{source}: model_type {model_type!r} is not one transformers {transformers.__version__} knows; "
            "upgrade transformers or use a supported model"
        )
    return dict(config)


def hf_class(config: Mapping[str, Any], arch: str | None, source: str) -> type:
    """The transformers class to build: the one `arch` names (hf:CLASS, e.g. hf:AutoModel or
    hf:BertForSequenceClassification), else the first of the config's `architectures`."""
    transformers = transformers_module()
    if arch is not None:
        if not arch.startswith(HF_PREFIX) or len(arch) == len(HF_PREFIX):
            raise MPOCompressError(
                f"--arch {arch!r} does not name a Hugging Face class; write hf:CLASS, e.g. hf:AutoModel or hf:BertModel"
            )
        name = arch[len(HF_PREFIX) :]
    else:
        names = config.get("architectures") or []
        if not names or not isinstance(names[0], str):
            raise MPOCompressError(
                f"{source}: config.json names no architecture; pass --arch hf:AutoModel (or a class such as hf:BertModel)"
            )
        name = names[0]
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not (hasattr(cls, "from_config") or issubclass(cls, transformers.PreTrainedModel)):
        raise MPOCompressError(
            f"transformers has no model class {name!r}; name one such as hf:AutoModel, hf:AutoModelForSequenceClassification "
            "or hf:BertModel"
        )
    return cls


def build_hf(config_json: str, arch: str, on_meta: bool = False) -> nn.Module:
    """A randomly initialised transformers model of class `arch` (hf:CLASS) from a config's JSON,
    in eval mode; on the meta device (no memory, no init) with `on_meta`."""
    try:
        config = bounded_json(config_json)
    except ValueError:
        raise MPOCompressError("the recorded Hugging Face config is not valid JSON; the file is damaged") from None
    config = check_config(config, "the recorded Hugging Face config")
    transformers = transformers_module()
    cls = hf_class(config, arch, "the recorded Hugging Face config")
    cfg = transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config)
    try:
        with torch.device("meta" if on_meta else "cpu"):
            model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a config it cannot build
        raise MPOCompressError(f"cannot build {arch} from its config ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.eval()


def probe_inputs(model: nn.Module, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small batch of token inputs a text model takes: input_ids within its vocabulary, an
    attention mask with padding in the second row, and token_type_ids when the model has them."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    ids = torch.randint(low=min(5, vocab - 1), high=vocab, size=(batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:
        mask[1, length // 2 :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.int64)
    return inputs
