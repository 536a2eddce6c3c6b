"""Builds a tiny Llama-architecture model with random but *meaningful* weights, no hub needed.

``load_format="dummy"`` cannot prove KV correctness (its flat weights make outputs ignore the
KV), so this writes a seeded random checkpoint: weights ~ N(0, 1/fan_in), norms at 1. Loading
wrong KV then changes the greedy output, and loading the right KV must not.

    python -m e2e.tiny_model DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 4096,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _corpus() -> list[str]:
    words = [
        "cache",
        "block",
        "key",
        "value",
        "token",
        "prefix",
        "engine",
        "agent",
        "pool",
        "node",
        "pod",
        "shared",
        "memory",
        "restart",
        "warm",
        "cold",
        "load",
        "save",
        "evict",
        "lease",
        "commit",
        "reserve",
        "layer",
        "head",
        "size",
        "tensor",
        "model",
        "vllm",
        "fabric",
    ]
    # Deterministic pseudo-text so the tokenizer is the same on every machine.
    return [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(40)) for i in range(400)]


def build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": CONFIG["max_position_embeddings"],
            }
        )
    )


def build_weights(out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    c = CONFIG
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]

    def lin(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = lin(v, h)
    save_file({k: t.contiguous() for k, t in w.items()}, str(out / "model.safetensors"))


def build(out: Path, seed: int = 1234) -> Path:
    """Writes config, tokenizer and weights into ``out`` (idempotent: skips if complete)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    build_tokenizer(out, CONFIG["vocab_size"])
    build_weights(out, seed)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))


#: A tiny DeepSeek-V2 (MLA attention): vLLM's CPU MLA kernels take only the real latent size,
#: kv_lora_rank 512 + rope 64. Dense MLP in both layers (first_k_dense_replace); bf16 (the CPU
#: MLA backend's weights).
MLA_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 2,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


#: The head sizes of DeepSeek-V2/V3 themselves: vLLM's CUDA MLA prefill kernels (FlashAttention,
#: FlashInfer) take only a few (qk_nope, rope, v) triples, and not the CPU model's smaller ones.
DEEPSEEK_HEAD_DIMS = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}


def build_mla(out: Path, seed: int = 7, deepseek_dims: bool = False) -> Path:
    """A seeded random DeepSeek-V2-shaped checkpoint (transformers builds the weights by name);
    ``deepseek_dims``: :data:`DEEPSEEK_HEAD_DIMS` (for CUDA engines)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(seed)
    config = {**MLA_CONFIG, **(DEEPSEEK_HEAD_DIMS if deepseek_dims else {})}
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = AutoModelForCausalLM.from_config(DeepseekV2Config(**fields))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # The config in its long-standing form (rope_theta, torch_dtype), which older transformers
    # (vLLM 0.26's) read as well as newer ones, instead of what this transformers writes.
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    build_tokenizer(out, MLA_CONFIG["vocab_size"])  # type: ignore[arg-type]
    return out
