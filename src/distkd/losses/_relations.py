"""DIST's two relation terms with a hand-written backward (fewer passes and saved tensors).

For probabilities ``y_s``, ``y_t`` viewed as ``(N, C, S)`` (instance ``i = (n, s)``, class ``j``)
and 0/1 weights ``w`` ``(N, 1, S)``:

- ``inter = sum_i w_i (1 - rho(y_s[i, :], y_t[i, :])) / max(n, 1)``, ``n = sum_i w_i`` (local);
- ``intra = (1 - mean_j rho(y_s[w, j], y_t[w, j])) * [n > 0]``, columns over the kept instances;

with ``rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + eps)``.

The gradient of ``rho`` w.r.t. ``a`` is ``B / D - c * A`` with ``A``, ``B`` the centred vectors,
``D = |A| |B| + eps`` and ``c = <A, B> |B| / (|A| D^2)``; it has zero mean, so the centring
projection leaves it unchanged. Both terms' gradients are therefore ``y_t * U - y_s * V + R`` with
``U``, ``V``, ``R`` sums of a per-instance and a per-class vector: the backward needs only
``y_s``, ``y_t`` and vectors, never the centred copies.

With ``global_batch`` the per-class statistics are summed over the ranks of the default process
group, and the intra term's incoming gradient is summed over ranks in the backward: this is the
gradient an autograd all-reduce would give (each rank gets ``world_size`` times its share when all
ranks back-propagate the same loss, so DDP's averaging yields the global gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

EPS = 1e-8


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _correlation_parts(dot: Tensor, square_a: Tensor, square_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``rho``, ``1 / D`` and ``c`` (see the module docstring) from ``<A, B>``, ``|A|^2``, ``|B|^2``."""
    norm_a, norm_b = square_a.sqrt(), square_b.sqrt()
    denominator = norm_a * norm_b + EPS
    rho = dot / denominator
    # |A| = 0 implies <A, B> = 0: c is 0 there, so any non-zero divisor does.
    c = rho * norm_b / (torch.where(norm_a > 0, norm_a, 1.0) * denominator)
    return rho, denominator.reciprocal(), c


def _centred_moments(
    y_s: Tensor,
    y_t: Tensor,
    mean_s: Tensor,
    mean_t: Tensor,
    weights: Tensor | None,
    dim: int | tuple[int, ...],
    keepdim: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``<A, B>``, ``|A|^2``, ``|B|^2`` along ``dim`` of ``A = w (y_s - mean_s)``, ``B = w (y_t - mean_t)``.

    Three input-sized buffers at most; the products reuse one buffer.
    """
    a, b = y_s - mean_s, y_t - mean_t
    if weights is not None:
        a.mul_(weights)
        b.mul_(weights)
    product = torch.mul(a, b)
    dot = product.sum(dim, keepdim=keepdim)
    square_a = torch.mul(a, a, out=product).sum(dim, keepdim=keepdim)
    square_b = torch.mul(b, b, out=product).sum(dim, keepdim=keepdim)
    return dot, square_a, square_b


class _RelationTerms(torch.autograd.Function):
    """``(y_s, y_t, weights, global_batch) -> (inter, intra)``; gradient w.r.t. ``y_s`` only."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, y_s: Tensor, y_t: Tensor, weights: Tensor | None, global_batch: bool
    ) -> tuple[Tensor, Tensor]:
        num_classes = y_s.shape[1]
        dims = (0, 2)
        # Inter-class relation: one correlation per instance, over the class dim.
        mean_s_row, mean_t_row = y_s.mean(1, keepdim=True), y_t.mean(1, keepdim=True)
        rho_row, inv_d_row, c_row = _correlation_parts(
            *_centred_moments(y_s, y_t, mean_s_row, mean_t_row, None, dim=1, keepdim=True)
        )
        # Intra-class relation: one correlation per class, over the kept instances.
        if weights is None:
            count = y_s.new_tensor([float(y_s.shape[0] * y_s.shape[2])])
            sums = torch.cat([y_s.sum(dims), y_t.sum(dims), count])
        else:
            sums = torch.cat([(y_s * weights).sum(dims), (y_t * weights).sum(dims), weights.sum().view(1)])
        local_count = sums[-1].clone()
        if global_batch:
            sums = _all_reduce_sum(sums)
        count = sums[-1]
        mean_s_col, mean_t_col = (sums[:-1] / count.clamp_min(1.0)).view(2, 1, num_classes, 1)
        moments = torch.cat(_centred_moments(y_s, y_t, mean_s_col, mean_t_col, weights, dim=dims))
        if global_batch:
            moments = _all_reduce_sum(moments)
        rho_col, inv_d_col, c_col = _correlation_parts(*moments.view(3, num_classes))

        kept = count > 0
        if weights is None:
            inter = (1.0 - rho_row).mean()
        else:
            inter = ((1.0 - rho_row) * weights).sum() / local_count.clamp_min(1.0)
        intra = (1.0 - rho_col.mean()) * kept.to(rho_col.dtype)
        ctx.save_for_backward(
            y_s, y_t, weights, mean_s_row, mean_t_row, inv_d_row, c_row, mean_s_col, mean_t_col,
            inv_d_col.view(1, num_classes, 1), c_col.view(1, num_classes, 1), local_count, kept,
        )  # fmt: skip
        ctx.global_batch = global_batch
        return inter, intra

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_inter: Tensor, grad_intra: Tensor) -> tuple[Tensor | None, ...]:
        (y_s, y_t, weights, mean_s_row, mean_t_row, inv_d_row, c_row, mean_s_col, mean_t_col,
         inv_d_col, c_col, local_count, kept) = ctx.saved_tensors  # fmt: skip
        if ctx.global_batch and _world_size() > 1:
            grad_intra = _all_reduce_sum(grad_intra.clone())
        num_classes = y_s.shape[1]
        # d inter / d rho_i = -w_i / n_local ; d intra / d rho_j = -[n_global > 0] / C.
        k_row = -grad_inter / local_count.clamp_min(1.0)
        if weights is not None:
            k_row = k_row * weights
        k_col = -grad_intra * kept.to(grad_intra.dtype) / num_classes
        u_row, v_row = k_row * inv_d_row, k_row * c_row
        u_col, v_col = k_col * inv_d_col, k_col * c_col
        r_row = v_row * mean_s_row - u_row * mean_t_row
        r_col = v_col * mean_s_col - u_col * mean_t_col
        if weights is None:
            u, v, r = u_row + u_col, v_row + v_col, r_row + r_col
        else:
            u = torch.addcmul(u_row, weights, u_col)
            v = torch.addcmul(v_row, weights, v_col)
            r = torch.addcmul(r_row, weights, r_col)
        grad = torch.addcmul(r, y_t, u)
        grad.addcmul_(y_s, v, value=-1.0)
        return grad, None, None, None


def relation_terms(
    y_s: Tensor, y_t: Tensor, weights: Tensor | None, *, global_batch: bool = False
) -> tuple[Tensor, Tensor]:
    """DIST's ``(inter, intra)`` terms of probabilities ``(N, C, S)``; ``weights``: 0/1 ``(N, 1, S)``.

    ``global_batch`` sums the intra term's statistics over all ranks (when a process group with
    more than one rank is initialised). A term with no kept instance is 0.
    """
    global_batch = global_batch and _world_size() > 1
    return _RelationTerms.apply(y_s, y_t.detach(), weights, global_batch)
