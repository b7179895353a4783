"""Everything that touches files: model files (`model_files`), their metadata and digests
(`metadata`), PyTorch checkpoints and trust (`pickles`), training states (`train_state`), output
paths and atomic writes (`paths`), and datasets (`data`)."""

from mpocompress.io.metadata import DIGEST_KEY, FORMAT, FORMAT_VERSION, tensors_digest
from mpocompress.io.model_files import LoadedModel, arch_for_second, load, load_model, mpo_layer_specs, read_metadata, save
from mpocompress.io.paths import check_output_path, checkpoint_path_for
from mpocompress.io.train_state import (
    is_sharded_checkpoint,
    load_sharded_tensors,
    load_train_state,
    remove_train_state,
    save_sharded_train_state,
    save_train_state,
)  # fmt: skip

__all__ = [
    "DIGEST_KEY", "FORMAT", "FORMAT_VERSION", "LoadedModel", "arch_for_second", "check_output_path", "checkpoint_path_for",
    "is_sharded_checkpoint", "load", "load_model", "load_sharded_tensors", "load_train_state", "remove_train_state",
    "save_sharded_train_state", "mpo_layer_specs", "read_metadata", "save", "save_train_state",
    "tensors_digest",
]  # fmt: skip
