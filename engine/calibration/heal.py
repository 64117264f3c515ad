"""Healing: a short distillation that teaches a width-pruned model to match its dense teacher.

Slicing keeps weights that were trained next to the heads and channels it removed; compensation
(a least-squares refit of each layer's output projections) repairs each layer on its own, against
dense inputs, so errors still add up through depth. A few hundred steps of knowledge distillation (the KL
divergence from the dense model's next-token distribution to the pruned model's, at every
position of calibration text, as Minitron does after width pruning) recover most of the rest.
Every layer tensor trains; the embeddings, final norm and LM head stay frozen, so a plan stores
only its layers' tensors, in a safetensors file next to it (the plan's `weights` field).

A 135M student fits a few hundred thousand tokens of one file far better than unseen text (after
300 steps on WikiText, KL on held-out windows is about 2.3x the training KL), so `heal` can
measure the KL on validation windows it never trains on and keep the weights of the best
measurement; calibration.json records that curve.

Teacher and student run the engine's own forward over a fresh paged KV cache, so training sees the
math that serving runs (cache writes and gathers are differentiable).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from trident.engine.loader import load_checkpoint
from trident.engine.model import LlamaModel
from trident.engine.pruning.apply import apply_plan
from trident.engine.pruning.plan import PruningPlan
from trident.kernels.metadata import AttentionMetadata

BLOCK_SIZE = 16


def forward_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B * L, vocab] for B sequences of L tokens ([B, L] ids), each from position 0."""
    batch, length = ids.shape
    blocks = -(-length // BLOCK_SIZE)
    tables = [list(range(s * blocks, (s + 1) * blocks)) for s in range(batch)]
    device = ids.device
    meta = AttentionMetadata.build(tables, [length] * batch, [length] * batch, BLOCK_SIZE, device)
    slots = batch * blocks * BLOCK_SIZE
    dtype = model.embed_tokens.weight.dtype
    caches = [(torch.zeros(slots, layer.self_attn.num_kv_heads, model.config.head_dim, dtype=dtype, device=device),
               torch.zeros(slots, layer.self_attn.num_kv_heads, model.config.head_dim, dtype=dtype, device=device))
              for layer in model.layers]
    hidden = model(ids.reshape(-1), meta.query_positions, meta, caches)
    return model.compute_logits(hidden)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over the vocabulary."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    log_target=True, reduction="batchmean")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 matmuls where the hardware has them (GPUs, CPUs with AMX / AVX512-BF16), else none."""
    from trident.engine.config import cpu_has_bf16_matmul
    return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matmul() else None


@torch.no_grad()
def held_out_kl(teacher: LlamaModel, student: LlamaModel, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean KL(teacher || student) per position over [N, L] token windows."""
    total = 0.0
    for batch in windows.split(batch_size):
        total += distill_loss(forward_logits(student, batch), forward_logits(teacher, batch)).item() * len(batch)
    return total / len(windows)


def heal(teacher: LlamaModel, student: LlamaModel, windows: list[list[int]], steps: int, lr: float = 2e-4,
         batch_size: int = 4, seed: int = 0, desc: str = "healing", val_windows: list[list[int]] | None = None,
         eval_every: int = 25) -> dict:
    """Train `student`'s layers for `steps` AdamW steps (linear warm-up, cosine decay) to match
    `teacher` on batches of equal-length `windows`. With `val_windows`, the KL on them is measured
    every `eval_every` steps and at the end, and the student keeps the weights of the best
    measurement (early stopping, a guard for long runs on a few hundred thousand tokens).
    Returns {"losses": every step's training loss, "val": [(step, kl), ...], "best_step"}.
    Deterministic for fixed inputs and seed."""
    if steps <= 0:
        return {"losses": [], "val": [], "best_step": 0}
    if not windows or len({len(w) for w in windows + (val_windows or [])}) != 1:
        raise ValueError("healing needs at least one window, all of the same length")
    device = next(student.parameters()).device
    data = torch.tensor(windows, dtype=torch.long, device=device)
    val = torch.tensor(val_windows, dtype=torch.long, device=device) if val_windows else None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).to(device)
    size = min(batch_size, len(data))
    student.requires_grad_(False)
    named = [(name, p) for name, p in student.named_parameters() if name.startswith("layers.")]
    params = [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    amp = autocast_dtype(device)
    losses, history, best = [], [], None

    def validate(step: int) -> None:
        nonlocal best
        student.eval()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            kl = held_out_kl(teacher, student, val)
        student.train()
        history.append((step, kl))
        if best is None or kl < best[1]:
            best = (step, kl, {name: p.detach().clone() for name, p in named})

    try:
        if val is not None:
            validate(0)
        student.train()
        with tqdm(range(steps), desc=desc, unit="step") as bar:
            for step in bar:
                # Wrap around the shuffled order, so every step trains on `size` windows.
                batch = data[order[(step * size + torch.arange(size, device=device)) % len(data)]]
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    with torch.no_grad():
                        target = forward_logits(teacher, batch)
                    loss = distill_loss(forward_logits(student, batch), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if val is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                    validate(step + 1)
                bar.set_postfix(kl=f"{losses[-1]:.4f}", **({"val_kl": f"{history[-1][1]:.4f}"} if history else {}))
    finally:
        student.eval()
        student.requires_grad_(False)
    if best is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(best[2][name])
    return {"losses": losses, "val": history, "best_step": best[0] if best else steps}


def layer_tensors(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The present layers' tensors under HF names (fused q/k/v and gate/up split back), float32."""
    out = {}
    head_dim = model.config.head_dim
    for layer in model.layers:
        p = f"model.layers.{layer.spec.index}."
        attn, mlp = layer.self_attn, layer.mlp
        sizes = [attn.num_heads * head_dim, attn.num_kv_heads * head_dim, attn.num_kv_heads * head_dim]
        tensors = {
            "input_layernorm.weight": layer.input_layernorm.weight,
            "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            "self_attn.o_proj.weight": attn.o_proj.weight,
            "mlp.down_proj.weight": mlp.down_proj.weight,
        }
        for name, w in zip(("q_proj", "k_proj", "v_proj"), attn.qkv_proj.weight.split(sizes)):
            tensors[f"self_attn.{name}.weight"] = w
        if attn.qkv_proj.bias is not None:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), attn.qkv_proj.bias.split(sizes)):
                tensors[f"self_attn.{name}.bias"] = b
        if attn.o_proj.bias is not None:
            tensors["self_attn.o_proj.bias"] = attn.o_proj.bias
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        tensors["mlp.gate_proj.weight"], tensors["mlp.up_proj.weight"] = gate, up
        if mlp.down_proj.bias is not None:
            tensors["mlp.down_proj.bias"] = mlp.down_proj.bias
        out.update({p + k: v.detach().float().contiguous().cpu() for k, v in tensors.items()})
    return out


def heal_plan(plan: PruningPlan, teacher: LlamaModel, model: str, windows: list[list[int]], steps: int,
              lr: float, out_dir: Path, val_windows: list[list[int]] | None = None) -> dict:
    """Heal the model `plan` slices from `model` (starting from its weights file, if any); write
    `<plan name>.safetensors` into `out_dir` and point `plan.weights` at it. Returns the first and
    last distillation losses and, with `val_windows`, the validation KL curve and the step kept."""
    ckpt = load_checkpoint(model)
    student = LlamaModel.from_hf_state_dict(ckpt.config, apply_plan(ckpt.state_dict, ckpt.config, plan),
                                            teacher.rotary.cos.shape[0], torch.float32,
                                            teacher.embed_tokens.weight.device)
    run = heal(teacher, student, windows, steps, lr, desc=f"healing {plan.name}", val_windows=val_windows)
    save_file(layer_tensors(student), str(out_dir / f"{plan.name}.safetensors"))
    plan.weights = f"{plan.name}.safetensors"
    return {"steps": steps, "lr": lr, "windows": len(windows), "val_windows": len(val_windows or []),
            "kl_first": run["losses"][0], "kl_last": run["losses"][-1], "val_kl": run["val"],
            "best_step": run["best_step"]}

