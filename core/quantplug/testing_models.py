"""Tiny random-weight Transformers models for tests, built locally (nothing is downloaded): a
Llama, and the mixture-of-experts layouts of Transformers 5 (Mixtral: ``block_sparse_moe`` and
``w1``/``w3``/``w2`` in its checkpoints; Qwen3-MoE: ``gate_proj``/``up_proj``/``down_proj``;
gpt-oss: transposed, interleaved gate/up with biases and a clamped SwiGLU)."""

from __future__ import annotations

from typing import Any

MOE_ARCHS = ("mixtral", "qwen3_moe", "gpt_oss")


def tiny_llama(seed: int = 0, **overrides: Any):
    """A small random-weight Llama (2 layers, hidden 128) built locally; nothing is downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def token_ids(vocab: int = 384, shape=(2, 12), seed: int = 1):
    """Deterministic random token ids."""
    import torch

    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    """The model's logits for ``ids``, without gradients."""
    import torch

    with torch.no_grad():
        return model(ids).logits


def tiny_moe(arch: str, seed: int = 0, **overrides: Any):
    """A small random-weight MoE causal LM of ``arch`` (one of ``MOE_ARCHS``): 2 layers, hidden
    256, 8 experts of intermediate 256, top-2, so experts hold most of the weights (as at scale);
    ``overrides`` are config fields (e.g. ``num_hidden_layers=4, num_experts=32`` for Qwen3-MoE)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=384,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    if arch == "mixtral":
        cls, config_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
        kwargs.update(num_local_experts=8)
    elif arch == "qwen3_moe":
        cls, config_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
        kwargs.update(num_experts=8, moe_intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "gpt_oss":
        cls, config_cls = transformers.GptOssForCausalLM, transformers.GptOssConfig
        kwargs.update(
            num_local_experts=8, layer_types=["full_attention", "sliding_attention"], sliding_window=16
        )
        kwargs.update(rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    else:
        raise ValueError(f"tiny_moe: unknown arch {arch!r}; one of {MOE_ARCHS}")
    config = config_cls(**{**kwargs, **overrides})  # overrides: any config field (sizes, counts)
    model = cls(config)
    with torch.no_grad():  # Transformers initialises stacked experts (and gpt-oss's router) to zero
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.02)
            elif name.endswith(("mlp.gate.weight", "router.weight")):
                # decisive routers, as trained ones are: with near-ties, quantization noise anywhere
                # flips a token's experts, and the logits move for reasons no backend controls
                p.normal_(0, 0.5)
    return model.eval()
