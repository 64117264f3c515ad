"""Frozen engine configuration, layered: model -> cache -> scheduler -> engine.

Each dataclass checks itself in __post_init__ so a bad flag fails at start-up with a clear message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int            # query heads
    num_kv_heads: int         # key/value heads (grouped-query attention)
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # HF-style dict, e.g. {"rope_type": "llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False                  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * f + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


# Without --kv-cache-memory: 1 GiB, or room for AUTO_KV_SEQUENCES sequences of max_model_len if
# that is more, so a model served at its full context still holds a few of them.
AUTO_KV_MEMORY = 1 << 30
AUTO_KV_SEQUENCES = 4


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16                 # tokens per KV block
    num_blocks: int | None = None        # explicit block count; None = derive from kv_cache_memory
    kv_cache_memory: int | None = None   # bytes for K and V of all layers; None = AUTO_KV_MEMORY or more
    enable_prefix_caching: bool = True   # share full blocks of identical prefixes across requests

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32               # running sequences per step
    max_num_batched_tokens: int = 512    # tokens (prefill chunks + decodes) per step
    max_model_len: int | None = None     # prompt + output tokens of one sequence; None = the model's context
    max_waiting: int = 1024              # queue bound; beyond it new requests are refused (HTTP 429)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Lossless self-speculative decoding: a draft that runs the served model without some of its
    layers proposes tokens, the full model verifies them (engine/speculative.py)."""

    draft: str                           # a depth plan (profile name or JSON file) or comma-separated layers to skip
    num_draft_tokens: int = 3            # tokens drafted per step, the default of every request

    def __post_init__(self) -> None:
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: str                           # path to a GGUF file or HF folder, or a known alias
    dtype: str = "auto"                  # "auto" | "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    seed: int = 0
    plan: str | None = None              # pruning plan: a JSON file or a profile name; None = unpruned
    plans: tuple[str, ...] = ()          # several plans served side by side (engine/variants.py); the first is the default
    speculative: SpeculativeConfig | None = None   # None = speculative decoding off
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # The GEMM provider of decode-sized float32 CPU products (kernels/cpu_gemm.py): "auto" measures
    # them on this machine (cached), a provider name pins one. TRIDENT_CPU_GEMM sets the default.
    cpu_gemm: str = field(default_factory=lambda: os.environ.get("TRIDENT_CPU_GEMM", "auto"))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        from trident.kernels.cpu_gemm import MODES

        if self.cpu_gemm not in MODES:
            raise ValueError(f"cpu_gemm must be one of {', '.join(MODES)}, got {self.cpu_gemm!r}")

    @property
    def resolved_dtype(self) -> str:
        """`auto` picks by measurement (bench/offline.py): bfloat16 on GPUs and on CPUs with bf16
        matrix units (AMX / AVX512-BF16; on a 2-core AVX512-BF16 VM: 2.3x prefill, 2.3x 16-way and
        1.2x batch-1 decode over float32); float32 on other CPUs, where bf16 matmuls are emulated
        and slower."""
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda") or cpu_has_bf16_matmul():
            return "bfloat16"
        return "float32"


def cpu_has_bf16_matmul() -> bool:
    from trident.kernels.backend import cpu_info

    flags = cpu_info().flags
    return "amx_bf16" in flags or "avx512_bf16" in flags
