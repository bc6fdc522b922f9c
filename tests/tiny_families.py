"""Tiny random models of every family in the architecture matrix, built from transformers' config classes.

Each entry: the config class name, the CausalLM class name, the family's own config fields, and whether
kvforge supports it (else the words its refusal must name). Nothing downloads: the weights are random, the
tokenizer is the tests' trained BPE (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 512  # sliding windows of the tiny models: below their 1024-token context, so the cap shows

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
                    sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    # refused, with the reason their error must name
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32, linear_num_value_heads=2,
                        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention"])),
}
REFUSED = {"qwen3_next": "linear_attention", "gpt_oss": "sinks"}
SUPPORTED = [f for f in FAMILIES if f not in REFUSED]


def make_family(path: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model with ``tokenizer`` into ``path``."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = getattr(transformers, config_name)(**(common | extra))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # peaked, input-sensitive attention, as in conftest's tiny models
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(2.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
