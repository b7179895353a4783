"""Tiny decoder language models for the tests, built from configs (no download): a byte-level
tokenizer (every byte a token, no merges, so any text tokenizes), and Hugging Face folders of a
Llama with grouped-query attention and tied embeddings, a Qwen2 and a GPT-2 LM head; and the same
Llama written as a GGUF file with the `gguf` package (F32 tensors, llama.cpp's q/k row order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|eos|>"


def byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every byte one token (ids 0-255 in the byte-level alphabet's order), the end-of-text token 256."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


VOCAB = 257
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=VOCAB - 1,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    ),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def make_lm(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[kind])(CONFIGS[kind]()).eval()
    with torch.no_grad():  # trained-looking scales: norms near 1, weights not all tiny
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    return model


def write_folder(kind: str, folder: Path, seed: int = 0) -> Path:
    model = make_lm(kind, seed)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of q/k (its rotary pairs), which transformers' GGUF reader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path) -> Path:
    """A Llama (as `make_lm('llama')`) as a GGUF file with F32 tensors and the byte tokenizer."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [*byte_alphabet(), EOS]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif ours == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
