"""Tiny random Llama models saved locally, as an HF folder and as a GGUF file (no hub access).

The tokenizer is a byte-level BPE trained on a few sentences, with ChatML special tokens and a
chat template, so every server path (chat, stop strings, logprobs) works on a model that loads
in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Trident serves language models through an HTTP API and prunes layers, heads and tokens.",
    "Write a short poem about the sea. Explain why the sky is blue. List three prime numbers: 2, 3, 5.",
    "Once upon a time there was a dragon who liked to read books in the library.",
    "user assistant system hello world 0 1 2 3 4 5 6 7 8 9 ! ? , . ; : ( ) [ ] { } - + * / = < > \" '",
]


def tiny_config(vocab_size: int, **overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_tiny_hf_model(path: Path, seed: int = 0, family: str = "llama", **config_overrides) -> Path:
    """Write config.json, model.safetensors and tokenizer files of a random tiny model of `family`
    (a key of FAMILIES) to `path`. Biases, where the family has them, are random too."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = tiny_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id, model_type=family,
                      architectures=[FAMILIES[family]], **config_overrides)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **{k: v for k, v in cfg.items() if k != "model_type"})
    model = getattr(transformers, FAMILIES[family])(config)
    with torch.no_grad():   # larger weights than the default init give peaked, seed-sensitive outputs
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **cfg}))
    return path


def _permute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary pairs), the inverse of the loader's unpermute."""
    shape = w.shape
    return w.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def build_tiny_gguf(hf_dir: Path, out_file: Path) -> Path:
    """Convert a tiny HF folder to a float32 GGUF file the way llama.cpp's converter lays it out
    (q/k rows interleaved for llama and mistral, as llama.cpp does; qwen2 keeps HF's order)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    state = load_file(str(Path(hf_dir) / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    arch = cfg.get("model_type", "llama")
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, t in state.items():
        arr = t.float().numpy()
        if name in names:
            gname = names[name]
        else:
            _, _, idx, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{idx}.{layer_names[module]}.{suffix}"
            if module == "self_attn.q_proj" and arch != "qwen2":
                arr = _permute_rope(arr, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj" and arch != "qwen2":
                arr = _permute_rope(arr, cfg["num_key_value_heads"])
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_file)
