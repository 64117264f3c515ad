"""Apply a pruning plan to a checkpoint: physically slice weights so every GEMM gets smaller.

Works on HF-named state dicts before the model is built, so model code never learns how its
weights were chosen. Per layer:
- dropped layer: its tensors are removed (the model then has no such layer);
- kept query heads: rows of q_proj, columns of o_proj; kept KV heads: rows of k_proj/v_proj;
  when the kept heads no longer form equal contiguous groups, `virtual_q_heads` ([kept q heads],
  int64) places each query head in a layout of `group` slots per kept KV head (slot // group is
  the KV head it reads), which the attention op takes as its kept-heads list;
- kept FFN channels: rows of gate_proj/up_proj, columns of down_proj;
- compensation biases become o_proj.bias / down_proj.bias (added to the checkpoint's own, if any);
- then the plan's `weights` file, if any, replaces tensors of the sliced model (same names and
  shapes, checked).
"""
from __future__ import annotations

import torch

from trident.engine.config import ModelConfig
from trident.engine.pruning.plan import PlanError, PruningPlan


def apply_plan(state: dict[str, torch.Tensor], config: ModelConfig, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """A new state dict for the pruned model (tensors shared with `state` where untouched)."""
    plan.validate(config, PruningPlan.checkpoint_digest(state))
    out = dict(state)
    d = config.head_dim
    group = config.num_heads // config.num_kv_heads
    for i, layer in enumerate(plan.layers):
        p = f"model.layers.{i}."
        if not layer.keep:
            for key in [k for k in out if k.startswith(p)]:
                del out[key]
            continue
        if layer.kept_q_heads is not None or layer.kept_kv_heads is not None:
            q_heads = sorted(layer.kept_q_heads) if layer.kept_q_heads is not None else list(range(config.num_heads))
            kv_heads = plan.kv_heads_of(i, config)
            q_rows = torch.tensor([h * d + j for h in q_heads for j in range(d)])
            kv_rows = torch.tensor([h * d + j for h in kv_heads for j in range(d)])
            out[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][q_rows]
            out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows]
            for name in ("k_proj", "v_proj"):
                out[p + f"self_attn.{name}.weight"] = state[p + f"self_attn.{name}.weight"][kv_rows]
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                if p + f"self_attn.{name}.bias" in state:
                    out[p + f"self_attn.{name}.bias"] = state[p + f"self_attn.{name}.bias"][rows]
            slots = [kv_heads.index(h // group) * group + h % group for h in q_heads]
            per_kv = {k: sum(h // group == k for h in q_heads) for k in kv_heads}
            if len(set(per_kv.values())) > 1:              # unequal groups: map heads explicitly
                out[p + "self_attn.virtual_q_heads"] = torch.tensor(slots, dtype=torch.long)
        if layer.kept_ffn_channels is not None:
            ch = torch.tensor(sorted(layer.kept_ffn_channels), dtype=torch.long)
            for name in ("gate_proj", "up_proj"):
                out[p + f"mlp.{name}.weight"] = state[p + f"mlp.{name}.weight"][ch]
            out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch]
        # Compensation adds to a bias the checkpoint already has (Llama with attention_bias / mlp_bias).
        for name, bias in (("self_attn.o_proj.bias", layer.attn_bias), ("mlp.down_proj.bias", layer.ffn_bias)):
            if bias is not None:
                extra = torch.tensor(bias, dtype=torch.float32)
                out[p + name] = state[p + name].float() + extra if p + name in state else extra
    if plan.weights is not None:
        out.update(_plan_weights(plan, out))
    return out


def _plan_weights(plan: PruningPlan, sliced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = plan.weights_path
    if not path.is_file():
        raise PlanError(f"plan {plan.name!r} names weights file {path}, which does not exist "
                        f"(keep a plan and its .safetensors file in the same folder)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PlanError(f"plan {plan.name!r}: cannot read weights file {path}: {e}") from e
    for name, tensor in tensors.items():
        if name not in sliced:
            raise PlanError(f"weights file {path}: tensor {name!r} is not in the pruned model")
        if tensor.shape != sliced[name].shape:
            raise PlanError(f"weights file {path}: {name!r} has shape {tuple(tensor.shape)}, the pruned model "
                            f"{tuple(sliced[name].shape)}; the file belongs to another plan")
    return {name: tensor.float() for name, tensor in tensors.items()}
