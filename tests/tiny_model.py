"""Tiny random Hugging Face models built offline (no hub), for end-to-end tests.

``make_tiny_llama(dir)`` writes config.json, model.safetensors (bf16) and a word-level tokenizer
with a chat template, enough for vLLM to load and serve it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("the a an of to and in is it that for on with as was he she they we you I be this "
         "have from or by one had not but what all were when there can more if out so said up "
         "about other into than them then some her would make like him time has two look see "
         "number no way could people my first water been call who oil its now find long down "
         "day did get come made may part hello world paris france capital city river cat dog").split()


def make_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in WORDS + [chr(c) for c in range(33, 127)]:
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    fast.save_pretrained(path)


def make_tiny_llama(path, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 512, seed: int = 0,
                    tie: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # large enough weights that the logits are far from uniform
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, vocab)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


def _save_random(model, path: Path, vocab: int, dtype: torch.dtype) -> Path:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, vocab)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


def make_tiny_moe(path, arch: str = "qwen2_moe", vocab: int = 512, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random mixture-of-experts model: ``qwen2_moe`` (4 experts, a shared expert and its
    gate), ``qwen3_moe`` (4 experts, q/k norms) or ``mixtral`` (4 experts)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, num_experts_per_tok=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            intermediate_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            num_experts=4, **common))
    elif arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=256, num_local_experts=4,
                                                 **common))
    elif arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            intermediate_size=256, moe_intermediate_size=64, num_experts=4, head_dim=32,
            norm_topk_prob=True, **common))
    elif arch == "deepseek_v2":
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
        model = DeepseekV2ForCausalLM(DeepseekV2Config(
            intermediate_size=256, moe_intermediate_size=64, n_routed_experts=4,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512,
            qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, topk_method="greedy",
            n_group=1, topk_group=1, **common))
    else:
        raise ValueError(arch)
    return _save_random(model, path, vocab, dtype)
