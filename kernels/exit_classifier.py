"""Fused early-exit classifier for the rows (tokens) that reach an exit point.

For hidden rows x [R, H] it computes x_hat = RMSNorm(x) and then
  (a) a learned probe: probe_score = sigmoid(x_hat . w_probe + b_probe), and/or
  (b) LM-head statistics of logits = x_hat @ lm_head^T [R, V], tile by tile over the vocabulary,
      so the [R, V] logits never exist: logsumexp, max probability, argmax, top-2 margin, entropy.
One statistic (the criterion) decides: a row exits when it is >= threshold (entropy: <= threshold).
The output also holds the exiting and continuing rows as compacted index lists.

Kernels: a row kernel (norm, probe score), a vocab-split kernel whose programs each stream a
contiguous chunk of lm_head rows once and keep running per-row statistics, a merge across chunks,
and a one-program compaction (prefix sum of the exit mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trident.kernels.backend import tl, triton, use_triton
from trident.kernels.fused_norm import rms_norm_ref
from trident.kernels.launch import FLOAT_DTYPES, MIN_DOT, check, check_tensor, dot_precision, num_sms, pow2_at_least

CRITERIA = ("probe", "max_prob", "margin", "entropy")


@dataclass
class ExitDecision:
    exit_mask: torch.Tensor                  # [R] bool: row exits at this point
    exit_rows: torch.Tensor                  # [E] int64: rows that exit, ascending
    continue_rows: torch.Tensor              # [R - E] int64: rows that go deeper, ascending
    probe_score: torch.Tensor | None = None  # [R] float32 sigmoid probe output (when a probe is given)
    logsumexp: torch.Tensor | None = None    # [R] float32 over the vocabulary (when lm_head is given)
    max_prob: torch.Tensor | None = None     # [R] float32
    argmax: torch.Tensor | None = None       # [R] int64 token id, lowest id on ties
    margin: torch.Tensor | None = None       # [R] float32 top-1 minus top-2 probability
    entropy: torch.Tensor | None = None      # [R] float32 in nats


@triton.jit
def _exit_norm_kernel(
    x_ptr, norm_w_ptr, probe_w_ptr, normed_ptr, probe_ptr, stride_x, hidden, eps, probe_bias,
    HAS_PROBE: tl.constexpr, STORE_NORMED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    norm_w = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = normed_ptr.dtype.element_ty
    normed = ((x * rstd).to(dt).to(tl.float32) * norm_w).to(dt)        # fused_norm.py's definition
    if STORE_NORMED:
        tl.store(normed_ptr + row * hidden + offs, normed, mask=mask)
    if HAS_PROBE:
        probe_w = tl.load(probe_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(probe_ptr + row, tl.sigmoid(tl.sum(normed.to(tl.float32) * probe_w, 0) + probe_bias))


@triton.jit
def _lm_head_stats_kernel(
    normed_ptr, w_ptr, part_ptr, part_arg_ptr, stride_w, num_rows, hidden, vocab, num_vocab_tiles,
    tiles_per_chunk, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_R >= 16 and BLOCK_V >= 16 and BLOCK_K >= 16)
    row_block, chunk = tl.program_id(0), tl.program_id(1)
    num_chunks = tl.num_programs(1)
    offs_r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < num_rows
    top1 = tl.full([BLOCK_R], float("-inf"), tl.float32)    # running max logit
    top2 = tl.full([BLOCK_R], float("-inf"), tl.float32)    # running second largest logit
    arg = tl.zeros([BLOCK_R], tl.int32)
    sum_exp = tl.zeros([BLOCK_R], tl.float32)                # sum exp(l - top1)
    sum_exp_logit = tl.zeros([BLOCK_R], tl.float32)          # sum exp(l - top1) * l
    tile_end = tl.minimum((chunk + 1) * tiles_per_chunk, num_vocab_tiles)
    for tile in range(chunk * tiles_per_chunk, tile_end):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab
        logits = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < hidden
            x = tl.load(normed_ptr + offs_r[:, None] * hidden + offs_k[None, :],
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)         # [BLOCK_R, BLOCK_K]
            w = tl.load(w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_k[None, :],
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)         # [BLOCK_V, BLOCK_K]
            logits = tl.dot(x, tl.trans(w), logits, input_precision=DOT_PRECISION)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        tile_top1, tile_arg = tl.max(logits, 1, return_indices=True, return_indices_tie_break_left=True)
        tile_top2 = tl.max(tl.where(tl.arange(0, BLOCK_V)[None, :] == tile_arg[:, None], float("-inf"), logits), 1)
        new_top1 = tl.maximum(top1, tile_top1)
        arg = tl.where(tile_top1 > top1, tile_arg + tile * BLOCK_V, arg)   # ties keep the lower id
        top2 = tl.maximum(tl.minimum(top1, tile_top1), tl.maximum(top2, tile_top2))
        rescale = tl.exp(top1 - new_top1)
        p = tl.exp(logits - new_top1[:, None])
        sum_exp = sum_exp * rescale + tl.sum(p, 1)
        sum_exp_logit = sum_exp_logit * rescale + tl.sum(tl.where(mask_v[None, :], p * logits, 0.0), 1)
        top1 = new_top1
    # part: [4, num_chunks, R] float32 (top1, top2, sum_exp, sum_exp_logit); part_arg: [num_chunks, R]
    base = chunk * num_rows + offs_r
    stride_stat = num_chunks * num_rows
    tl.store(part_ptr + base, top1, mask=mask_r)
    tl.store(part_ptr + stride_stat + base, top2, mask=mask_r)
    tl.store(part_ptr + 2 * stride_stat + base, sum_exp, mask=mask_r)
    tl.store(part_ptr + 3 * stride_stat + base, sum_exp_logit, mask=mask_r)
    tl.store(part_arg_ptr + base, arg, mask=mask_r)


@triton.jit
def _lm_head_merge_kernel(
    part_ptr, part_arg_ptr, stats_ptr, argmax_ptr, num_rows, num_chunks, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_rows
    stride_stat = num_chunks * num_rows
    top1 = tl.full([BLOCK], float("-inf"), tl.float32)
    top2 = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    sum_exp = tl.zeros([BLOCK], tl.float32)
    sum_exp_logit = tl.zeros([BLOCK], tl.float32)
    for chunk in range(num_chunks):      # chunks in vocab order: ties keep the lower id
        base = chunk * num_rows + offs
        c_top1 = tl.load(part_ptr + base, mask=mask, other=0.0)
        c_top2 = tl.load(part_ptr + stride_stat + base, mask=mask, other=0.0)
        c_sum = tl.load(part_ptr + 2 * stride_stat + base, mask=mask, other=0.0)
        c_sum_logit = tl.load(part_ptr + 3 * stride_stat + base, mask=mask, other=0.0)
        c_arg = tl.load(part_arg_ptr + base, mask=mask, other=0)
        new_top1 = tl.maximum(top1, c_top1)
        arg = tl.where(c_top1 > top1, c_arg, arg)
        top2 = tl.maximum(tl.minimum(top1, c_top1), tl.maximum(top2, c_top2))
        scale_old, scale_new = tl.exp(top1 - new_top1), tl.exp(c_top1 - new_top1)
        sum_exp = sum_exp * scale_old + c_sum * scale_new
        sum_exp_logit = sum_exp_logit * scale_old + c_sum_logit * scale_new
        top1 = new_top1
    lse = top1 + tl.log(sum_exp)
    max_prob = tl.exp(top1 - lse)
    # stats: [4, R] float32 (logsumexp, max_prob, margin, entropy)
    tl.store(stats_ptr + offs, lse, mask=mask)
    tl.store(stats_ptr + num_rows + offs, max_prob, mask=mask)
    tl.store(stats_ptr + 2 * num_rows + offs, max_prob - tl.exp(top2 - lse), mask=mask)
    tl.store(stats_ptr + 3 * num_rows + offs, lse - sum_exp_logit / sum_exp, mask=mask)
    tl.store(argmax_ptr + offs, arg.to(tl.int64), mask=mask)


@triton.jit
def _exit_compact_kernel(
    score_ptr, mask_ptr, exit_rows_ptr, continue_rows_ptr, count_ptr, num_rows, threshold,
    EXIT_BELOW: tl.constexpr, BLOCK: tl.constexpr,
):
    num_exit = tl.full([], 0, tl.int32)
    for start in range(0, num_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < num_rows
        score = tl.load(score_ptr + offs, mask=valid, other=0.0)
        if EXIT_BELOW:
            exits = (score <= threshold) & valid
        else:
            exits = (score >= threshold) & valid
        flag = exits.to(tl.int32)
        exit_rank = tl.cumsum(flag, 0) - flag                      # exiting rows before this one
        continue_rank = tl.arange(0, BLOCK) - exit_rank            # continuing rows before it
        tl.store(mask_ptr + offs, exits.to(tl.int8), mask=valid)
        tl.store(exit_rows_ptr + num_exit + exit_rank, offs.to(tl.int64), mask=exits)
        tl.store(continue_rows_ptr + (start - num_exit) + continue_rank, offs.to(tl.int64), mask=valid & ~exits)
        num_exit += tl.sum(flag, 0)
    tl.store(count_ptr, num_exit)


def _check(hidden, norm_weight, criterion, probe_weight, lm_head):
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    check_tensor("norm_weight", norm_weight, 1, FLOAT_DTYPES)
    check(norm_weight.shape[0] == hidden.shape[1],
          f"norm_weight {tuple(norm_weight.shape)} vs hidden {tuple(hidden.shape)}")
    check(criterion in CRITERIA, f"criterion must be one of {CRITERIA}, got {criterion!r}")
    check((probe_weight is not None) if criterion == "probe" else (lm_head is not None),
          f"criterion {criterion!r} needs {'probe_weight' if criterion == 'probe' else 'lm_head'}")
    if probe_weight is not None:
        check_tensor("probe_weight", probe_weight, 1, FLOAT_DTYPES)
        check(probe_weight.shape[0] == hidden.shape[1],
              f"probe_weight {tuple(probe_weight.shape)} vs hidden {tuple(hidden.shape)}")
    if lm_head is not None:
        check_tensor("lm_head", lm_head, 2, (hidden.dtype,))
        check(lm_head.shape[1] == hidden.shape[1] and lm_head.shape[0] > 0,
              f"lm_head {tuple(lm_head.shape)} vs hidden {tuple(hidden.shape)}")


def exit_classifier(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, threshold: float,
                    criterion: str = "probe", probe_weight: torch.Tensor | None = None,
                    probe_bias: float = 0.0, lm_head: torch.Tensor | None = None) -> ExitDecision:
    """Triton path. hidden: [R, H]; norm_weight, probe_weight: [H]; lm_head: [V, H] (hidden's dtype).

    x_hat = rms_norm(hidden) (rounded to hidden's dtype); probe_score = sigmoid(x_hat . probe_weight
    + probe_bias); with l = x_hat @ lm_head^T in float32 and p = softmax(l): logsumexp, max_prob =
    max p, argmax, margin = top-1 p - top-2 p, entropy = -sum p log p. criterion picks the score
    ("probe", "max_prob", "margin": exit if >= threshold; "entropy": exit if <= threshold).
    No [R, V] tensor is allocated. Reads the exit count back to the host once (to size the lists).
    """
    _check(hidden, norm_weight, criterion, probe_weight, lm_head)
    num_rows, hidden_size = hidden.shape
    device, f32 = hidden.device, torch.float32
    normed = torch.empty_like(hidden, memory_format=torch.contiguous_format) if lm_head is not None else hidden
    probe = torch.empty(num_rows, dtype=f32, device=device) if probe_weight is not None else None
    result = ExitDecision(exit_mask=torch.empty(num_rows, dtype=torch.bool, device=device),
                          exit_rows=torch.empty(num_rows, dtype=torch.int64, device=device),
                          continue_rows=torch.empty(num_rows, dtype=torch.int64, device=device),
                          probe_score=probe)
    if num_rows == 0:
        if lm_head is not None:
            result.logsumexp, result.max_prob, result.margin, result.entropy = torch.empty(4, 0, device=device)
            result.argmax = torch.empty(0, dtype=torch.int64, device=device)
        return result
    block_h = pow2_at_least(hidden_size)
    _exit_norm_kernel[(num_rows,)](
        hidden, norm_weight, probe_weight if probe_weight is not None else norm_weight, normed,
        probe if probe is not None else normed, hidden.stride(0), hidden_size, eps, probe_bias,
        HAS_PROBE=probe is not None, STORE_NORMED=lm_head is not None, BLOCK=block_h,
        num_warps=min(16, max(1, block_h // 256)))
    score = probe
    if lm_head is not None:
        vocab = lm_head.shape[0]
        block_r = min(64, pow2_at_least(num_rows, MIN_DOT))
        block_v = 128
        row_blocks, vocab_tiles = triton.cdiv(num_rows, block_r), triton.cdiv(vocab, block_v)
        # About two programs per SM, each streaming a contiguous run of vocab tiles.
        tiles_per_chunk = triton.cdiv(vocab_tiles, max(1, triton.cdiv(2 * num_sms(device), row_blocks)))
        num_chunks = triton.cdiv(vocab_tiles, tiles_per_chunk)
        part = torch.empty(4, num_chunks, num_rows, dtype=f32, device=device)
        part_arg = torch.empty(num_chunks, num_rows, dtype=torch.int32, device=device)
        _lm_head_stats_kernel[(row_blocks, num_chunks)](
            normed, lm_head, part, part_arg, lm_head.stride(0), num_rows, hidden_size, vocab,
            vocab_tiles, tiles_per_chunk, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_K=64,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=4 if block_r <= 16 else 8,
            num_stages=4 if hidden.dtype != f32 else 2)
        stats = torch.empty(4, num_rows, dtype=f32, device=device)
        result.argmax = torch.empty(num_rows, dtype=torch.int64, device=device)
        _lm_head_merge_kernel[(triton.cdiv(num_rows, 128),)](
            part, part_arg, stats, result.argmax, num_rows, num_chunks, BLOCK=128)
        result.logsumexp, result.max_prob, result.margin, result.entropy = stats.unbind(0)
        if criterion != "probe":
            score = getattr(result, criterion)
    count = torch.empty(1, dtype=torch.int32, device=device)
    _exit_compact_kernel[(1,)](
        score, result.exit_mask.view(torch.int8), result.exit_rows, result.continue_rows, count,
        num_rows, threshold, EXIT_BELOW=criterion == "entropy", BLOCK=1024)
    num_exit = int(count.item())
    result.exit_rows = result.exit_rows[:num_exit]
    result.continue_rows = result.continue_rows[:num_rows - num_exit]
    return result


def exit_classifier_ref(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, threshold: float,
                        criterion: str = "probe", probe_weight: torch.Tensor | None = None,
                        probe_bias: float = 0.0, lm_head: torch.Tensor | None = None) -> ExitDecision:
    """Torch twin of `exit_classifier` (same arguments and math; materializes the logits)."""
    _check(hidden, norm_weight, criterion, probe_weight, lm_head)
    normed = rms_norm_ref(hidden, norm_weight, eps).float()
    stats: dict[str, torch.Tensor] = {}
    if probe_weight is not None:
        stats["probe_score"] = torch.sigmoid(normed @ probe_weight.float() + probe_bias)
    if lm_head is not None:
        logits = normed @ lm_head.float().t()                                  # [R, V]
        lse = torch.logsumexp(logits, -1)
        top = logits.topk(min(2, logits.shape[1]), -1).values
        second = top[:, 1] if top.shape[1] > 1 else torch.full_like(lse, float("-inf"))
        stats["logsumexp"], stats["max_prob"], stats["argmax"] = lse, torch.exp(top[:, 0] - lse), logits.argmax(-1)
        stats["margin"] = stats["max_prob"] - torch.exp(second - lse)
        stats["entropy"] = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    score = stats["probe_score" if criterion == "probe" else criterion]
    exit_mask = score <= threshold if criterion == "entropy" else score >= threshold
    return ExitDecision(exit_mask=exit_mask, exit_rows=exit_mask.nonzero().squeeze(1),
                        continue_rows=(~exit_mask).nonzero().squeeze(1), **stats)


def exit_decision(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, threshold: float,
                  criterion: str = "probe", probe_weight: torch.Tensor | None = None,
                  probe_bias: float = 0.0, lm_head: torch.Tensor | None = None) -> ExitDecision:
    """The engine's entry point: the Triton kernels where `use_triton(hidden)`, the twin otherwise."""
    run = exit_classifier if use_triton(hidden) else exit_classifier_ref
    return run(hidden, norm_weight, eps, threshold, criterion, probe_weight, probe_bias, lm_head)
