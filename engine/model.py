"""Trident's Llama-family decoder: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU.

The model runs a packed batch of tokens ([T] ids) from many sequences at once; attention reads and
writes the paged KV cache through `kernels.attention`. Weights use HF names (q_proj, gate_proj, ...)
at load and are fused here (qkv, gate_up) so each layer runs two GEMMs fewer. Every layer reads its
own head and channel counts from its weights, so a width-pruned (sliced) model needs no flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trident.engine.config import ModelConfig
from trident.engine.step_pruning import StepPruning
from trident.kernels.attention import paged_attention
from trident.kernels.fused_norm import add_rms_norm_op, rms_norm_op
from trident.kernels.linear import Linear, linear
from trident.kernels.metadata import AttentionMetadata
from trident.kernels.rope import rope_cos_sin, rope_write_kv_op
from trident.kernels.swiglu import swiglu_op


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm, computed by kernels/fused_norm.py (its definition is there)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_op(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with the rope scaling schemes Llama checkpoints use."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        return scaled.float()
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


class Rotary(nn.Module):
    """cos/sin tables indexed by original token positions (rotate-half convention, kernels/rope.py)."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        cos, sin = rope_cos_sin(rope_inv_freq(config), max_positions)
        self.register_buffer("cos", cos, persistent=False)   # [P, D/2]
        self.register_buffer("sin", sin, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] of a step's positions, gathered once and shared by every layer."""
        return self.cos[positions], self.sin[positions]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: "LayerSpec") -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        q, kv = spec.num_heads * config.head_dim, spec.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, q + 2 * kv, bias=config.attention_bias)
        self.o_proj = Linear(q, config.hidden_size, bias=spec.attn_out_bias)
        # When pruning left unequal query groups, query head j sits at slot virtual_q_heads[j] of a
        # virtual layout with `group` slots per kept KV head, so slot // group is its KV head.
        self.group = config.num_heads // config.num_kv_heads
        self.register_buffer("virtual_q_heads", torch.zeros(spec.num_heads, dtype=torch.long)
                             if spec.ragged_groups else None)
        self.scale = config.head_dim ** -0.5

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                key_mass: torch.Tensor | None = None, mass_window: int = 1) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size = self.num_heads * self.head_dim
        qkv = self.qkv_proj(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        q = rope_write_kv_op(qkv, self.num_heads, *angles, k_cache, v_cache, meta.slot_mapping)
        if self.virtual_q_heads is None:
            out = paged_attention(q, k_cache, v_cache, meta, self.scale,               # [T, Hq, D]
                                  key_mass=key_mass, mass_window=mass_window)
        else:
            virtual = q.new_zeros(num_tokens, self.num_kv_heads * self.group, self.head_dim)
            virtual.index_copy_(1, self.virtual_q_heads, q)
            out = paged_attention(virtual, k_cache, v_cache, meta, self.scale, kept_q_heads=self.virtual_q_heads,
                                  key_mass=key_mass, mass_window=mass_window)
        return self.o_proj(out.reshape(num_tokens, q_size))


    def fill_kv(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Write the K/V of rows that skip this layer (they left through an early exit) from their
        normalized exit state x [R, hidden]: the K and V projections only, so later tokens that
        attend to them find no hole."""
        q_size = self.num_heads * self.head_dim
        bias = self.qkv_proj.bias[q_size:] if self.qkv_proj.bias is not None else None
        kv = linear(x, self.qkv_proj.weight[q_size:], bias).view(x.shape[0], 2 * self.num_kv_heads, self.head_dim)
        rope_write_kv_op(kv, 0, *angles, kv_cache[0], kv_cache[1], slot_mapping)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, out_bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_op(self.gate_up_proj(x)))


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one present layer, read from its weights (a pruned layer has fewer heads/channels)."""

    index: int                  # position in the unpruned model
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    attn_out_bias: bool = False  # o_proj bias (compensation for dropped heads)
    ffn_out_bias: bool = False   # down_proj bias (compensation for dropped channels)
    ragged_groups: bool = False  # query heads map to KV heads through virtual_q_heads

    @staticmethod
    def from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> list["LayerSpec"]:
        specs = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            if p + "self_attn.q_proj.weight" not in state:
                continue          # a dropped layer
            specs.append(LayerSpec(
                index=i,
                num_heads=state[p + "self_attn.q_proj.weight"].shape[0] // config.head_dim,
                num_kv_heads=state[p + "self_attn.k_proj.weight"].shape[0] // config.head_dim,
                intermediate_size=state[p + "mlp.gate_proj.weight"].shape[0],
                attn_out_bias=p + "self_attn.o_proj.bias" in state,
                ffn_out_bias=p + "mlp.down_proj.bias" in state,
                ragged_groups=p + "self_attn.virtual_q_heads" in state,
            ))
        return specs


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, spec)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, spec.intermediate_size, spec.ffn_out_bias)

    def forward(self, x, angles, meta, kv_cache, key_mass=None, mass_window=1):
        h = self.self_attn(self.input_layernorm(x), angles, meta, kv_cache, key_mass, mass_window)
        norm = self.post_attention_layernorm           # the residual add fused into the norm after it
        normed, x = add_rms_norm_op(h, x, norm.weight, norm.eps)
        return x + self.mlp(normed)


class LlamaModel(nn.Module):
    """Decoder over a packed token batch. `forward` returns final hidden states [T, hidden]."""

    def __init__(self, config: ModelConfig, max_positions: int, specs: list[LayerSpec]) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in specs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config, max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], pruning: StepPruning | None = None,
                layers: list[int] | None = None) -> torch.Tensor:
        """Final hidden states of the rows that reach the last layer: all T rows, or with `pruning`
        the rows it kept (`pruning.packed` lists which), each with its original position.
        `layers` (positions in self.layers) runs only those, as a speculative draft does."""
        x = self.embed_tokens(input_ids)                                # [T, hidden]
        angles = self.rotary.angles(positions)
        stack = zip(self.layers, kv_caches) if layers is None else ((self.layers[i], kv_caches[i]) for i in layers)
        for layer, kv_cache in stack:
            if pruning is None:
                x = layer(x, angles, meta, kv_cache)
                continue
            x = layer(x, angles, meta, kv_cache, pruning.key_mass(layer.spec.index), pruning.window)
            x, angles, meta = pruning.after_layer(layer.spec.index, x, angles)
            exited = pruning.take_exited()
            if exited is not None:          # rows that left: K/V of every deeper layer from their exit state
                states, exit_angles, slots = exited
                for deeper, deeper_cache in zip(self.layers, kv_caches):
                    if deeper.spec.index > layer.spec.index:
                        deeper.self_attn.fill_kv(deeper.input_layernorm(states), exit_angles, slots, deeper_cache)
            if x.shape[0] == 0:             # every row has left: the deeper layers have nothing to run
                break
        if pruning is not None:
            x = pruning.merge_exits(x)      # exited rows rejoin, in packed order, for the LM head
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    @classmethod
    def from_hf_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor], max_positions: int,
                           dtype: torch.dtype, device: torch.device) -> "LlamaModel":
        """Build from HF-named weights (q/k/v and gate/up fused here). Layer shapes come from the
        weights, so a pruned state dict (engine.pruning.apply) yields a pruned model."""
        with torch.device("meta"):    # no random init: every parameter is overwritten below
            model = cls(config, max_positions, LayerSpec.from_state_dict(config, state))
        model = model.to_empty(device=device).to(dtype)
        model.rotary = Rotary(config, max_positions).to(device)

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state[name].to(dtype)

        with torch.no_grad():
            model.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            model.norm.weight.copy_(take("model.norm.weight"))
            if config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight   # re-tie: to_empty() unties shared params
            else:
                model.lm_head.weight.copy_(take("lm_head.weight"))
            for layer in model.layers:
                p = f"model.layers.{layer.spec.index}."
                attn, mlp = layer.self_attn, layer.mlp
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
                attn.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if config.attention_bias:
                    attn.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                if layer.spec.attn_out_bias:
                    attn.o_proj.bias.copy_(take(p + "self_attn.o_proj.bias"))
                if layer.spec.ragged_groups:
                    attn.virtual_q_heads.copy_(state[p + "self_attn.virtual_q_heads"])
                mlp.gate_up_proj.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"),
                                                         take(p + "mlp.up_proj.weight")]))
                mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
                if layer.spec.ffn_out_bias:
                    mlp.down_proj.bias.copy_(take(p + "mlp.down_proj.bias"))
        return model.eval()
