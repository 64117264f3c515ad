"""Least-squares compensation: refit a sliced projection so it reproduces the dense output.

Slicing input channels out of o_proj (heads) or down_proj (FFN channels) leaves kept columns that
were trained next to the removed ones. Given calibration moments of the projection's input x,
E[x x^T] and E[x], the kept columns W' and bias b that best reproduce the dense output solve

    min_{W', b}  E || W x - (W' x_K + b) ||^2  +  lam || W' - W_K ||^2

    =>  [W', b] = (W C + lam [W_K, 0]) (G + lam I_K)^-1,
        G = E[z z^T], C = E[x z^T], z = [x_K; 1],  I_K = identity on the x_K block only.

The ridge term pulls toward the original columns (lam -> inf leaves them, with the best bias);
lam = damping * mean(diag E[x_K x_K^T]) keeps the solve stable when calibration has few tokens
per channel. Mean compensation (FLAP's bias, b = W_R E[x_R] with W' = W_K) is one candidate of
this fit, so on the calibration data the fit is never worse than it.
"""
from __future__ import annotations

import torch

DAMPING = 0.05
COMPENSATIONS = ("least-squares", "bias")     # what `trident calibrate --compensation` accepts


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor, kept: list[int],
                  damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, n]; gram = E[x x^T] [n, n]; mean = E[x] [n]; kept: sorted column indices.
    Returns (W' [out, len(kept)], b [out]) in float64."""
    n = weight.shape[1]
    if gram.shape != (n, n) or mean.shape != (n,):
        raise ValueError(f"moments of shape {tuple(gram.shape)}, {tuple(mean.shape)} do not fit a weight with "
                         f"{n} input columns")
    w, gram, mean = weight.double(), gram.double(), mean.double()
    k_idx = torch.tensor(kept, dtype=torch.long)
    k = len(kept)
    g = torch.empty(k + 1, k + 1, dtype=torch.float64)
    g[:k, :k] = gram[k_idx][:, k_idx]
    g[:k, k] = g[k, :k] = mean[k_idx]
    g[k, k] = 1.0
    c = torch.cat([gram[:, k_idx], mean[:, None]], dim=1)            # [n, k + 1]
    lam = damping * g.diagonal()[:k].mean().clamp_min(1e-12)
    g.diagonal()[:k] += lam
    rhs = w @ c                                                       # [out, k + 1]
    rhs[:, :k] += lam * w[:, k_idx]
    # g is symmetric positive definite (a damped second-moment matrix): Cholesky solve.
    sol = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(g)).T      # [out, k + 1]
    return sol[:, :k].contiguous(), sol[:, k].contiguous()
