"""DIST's two relation terms in one pass over the data, with a hand-written backward.

For logits ``z_s``, ``z_t`` viewed as ``(N, C, S)`` (instance ``i = (n, s)``, class ``j``),
probabilities ``y = softmax(z / tau)`` over ``j`` (or ``sigmoid(z / tau)``) and 0/1 weights ``w``
``(N, 1, S)`` (the kept positions; a dropped position counts as logits 0 and then as nothing):

- ``inter = sum_i w_i (1 - rho(y_s[i, :], y_t[i, :])) / max(n, 1)``, ``n = sum_i w_i`` (local);
- ``intra = (1 - mean_j rho(y_s[w, j], y_t[w, j])) * [n > 0]``, columns over the kept instances;

with ``rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + eps)``, every
sum taken over centred values: a row about its mean (``1 / C`` under a softmax), a column about
the mean of the chunk it lies in, the chunks' moments then merged about the column's mean (Chan
et al.'s pairwise update). Raw moments would cancel badly: a rare class's probabilities sit far
from any fixed shift such as ``1 / C``.

The gradient of ``rho`` w.r.t. ``a`` is ``B / D - c * A`` with ``A``, ``B`` the centred vectors,
``D = |A| |B| + eps`` and ``c = <A, B> |B| / (|A| D^2)``; it has zero mean, so the centring
projection leaves it unchanged. Both terms' gradients w.r.t. ``y_s`` are therefore
``y_t * U - y_s * V + R`` with ``U``, ``V``, ``R`` sums of a per-instance and a per-class vector:
the backward needs only ``y_s``, ``y_t`` and vectors, never the centred copies. Under a softmax
the per-instance part of ``R`` drops out (``y * (g - <g, y>)`` cancels a constant added to ``g``).

The work is memory-bound, so it is arranged to touch memory as little as possible: one sweep over
cache-sized chunks (about ``CPU_CHUNK_ELEMENTS`` elements each, along ``S`` for dense inputs and
along ``N`` otherwise; other devices get one chunk) computes the probabilities (saved for the
backward) and both terms' moments while the chunk is cached, with the temporaries in one reused
scratch buffer per thread and the squares taken in place. With several torch threads the chunks
are shared out to as many workers, each running its chunk's ops on one thread, instead of every
small op waiting at an OpenMP barrier (see ``_for_each_chunk``). Chunking only changes the order
of floating-point sums; the threads do not change it.

With ``global_batch`` the per-class statistics are summed over the ranks of the default process
group, and the intra term's incoming gradient is summed over ranks in the backward: this is the
gradient an autograd all-reduce would give (each rank gets ``world_size`` times its share when all
ranks back-propagate the same loss, so DDP's averaging yields the global gradient).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

EPS = 1e-8
CPU_CHUNK_ELEMENTS = 1 << 17
WORKER_MIN_CHUNKS = 2  # per thread: fewer chunks run in the calling thread (see _for_each_chunk)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _correlation_parts(moments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``rho``, ``1 / D`` and ``c`` (see the module docstring) from stacked ``<A, B>, |A|^2, |B|^2``."""
    norm_a, norm_b = moments[1:].sqrt()
    inv_d = torch.mul(norm_a, norm_b).add_(EPS).reciprocal_()
    rho = moments[0] * inv_d
    # |A| = 0 implies <A, B> = 0: c is 0 there, so any positive divisor does.
    c = (rho * inv_d).mul_(norm_b).div_(norm_a.clamp_min(torch.finfo(norm_a.dtype).tiny))
    return rho, inv_d, c


def _chunk_spans(shape: torch.Size, device: torch.device) -> tuple[int, list[tuple[int, int]]]:
    """The dim to split ``(N, C, S)`` along and its ``(start, length)`` chunks (one chunk off the CPU)."""
    n, c, s = shape
    dim = 2 if s > 1 else 0
    length = shape[dim]
    if device.type != "cpu":
        return dim, [(0, length)]
    # About CPU_CHUNK_ELEMENTS elements per thread: what one thread's ops take, or two workers' chunks together.
    step = max(1, CPU_CHUNK_ELEMENTS * torch.get_num_threads() // (n * c if dim == 2 else c))
    return dim, [(start, min(step, length - start)) for start in range(0, length, step)]


def _for_each_chunk(body: Callable[[int, Tensor], None], count: int, new_scratch: Callable[[], Tensor]) -> None:
    """``body(k, scratch)`` for every chunk ``k < count``, each thread with its own reused ``scratch``.

    Fewer than ``WORKER_MIN_CHUNKS`` per thread: run here, ops parallel inside as usual. More:
    ``torch.get_num_threads()`` workers take the chunks in turn, each running its ops on one thread. Each op of a
    chunk is too small to be worth an OpenMP team, and a team's barrier waits for its slowest thread: with a core
    taken by another process that stalled every op (4-11x KD's time here); workers that pull the next chunk when
    done do not wait for each other. The chunks write disjoint outputs, so the result does not depend on the order.
    """
    threads = torch.get_num_threads()
    if threads == 1 or count < WORKER_MIN_CHUNKS * threads:  # too few to share: threads' pool start-up dominates
        scratch = new_scratch()
        for k in range(count):
            body(k, scratch)
        return
    local = threading.local()

    def run(k: int) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = new_scratch()
        with torch.no_grad():  # grad mode is per thread; the caller's is off inside an autograd Function
            body(k, local.scratch)

    torch.set_num_threads(1)  # the workers' ops (new threads take the process-wide setting)
    try:
        with ThreadPoolExecutor(min(threads, count)) as pool:
            for _ in pool.map(run, range(count)):
                pass
    finally:
        torch.set_num_threads(threads)


def _activate(logits: Tensor, keep: Tensor | None, tau: float, sigmoid: bool, scratch: Tensor) -> Tensor:
    """Probabilities of ``logits`` ``(n, C, l)`` at temperature ``tau`` (a fresh tensor).

    A position ``keep`` ``(n, 1, l)`` drops counts as logits 0, whatever it holds (even inf or NaN).
    ``scratch`` (same shape) receives the scaled logits.
    """
    if keep is None:
        scaled = torch.div(logits, tau, out=scratch)
    else:
        scaled = torch.where(keep, logits, logits.new_zeros(()), out=scratch)
        if tau != 1.0:
            scaled.div_(tau)
    return scaled.sigmoid() if sigmoid else scaled.softmax(1)


def _centred_moments(
    out: Tensor,
    y_s: Tensor,
    y_t: Tensor,
    means: tuple[Tensor | float, Tensor | float],
    dim: int | tuple[int, ...],
    scratch: Tensor,
    weights: Tensor | None = None,
) -> None:
    """Writes ``<A, B>``, ``|A|^2``, ``|B|^2`` summed along ``dim`` to ``out[0]``, ``[1]``, ``[2]``.

    ``A = w (y_s - means[0])``, ``B = w (y_t - means[1])``, built in ``scratch`` ``(3, *y_s.shape)``.
    A single ``dim`` stays as a size-1 dim (per-row sums); a tuple of dims is summed away.
    """
    a = torch.sub(y_s, means[0], out=scratch[0])
    b = torch.sub(y_t, means[1], out=scratch[1])
    if weights is not None:
        a.mul_(weights)
        b.mul_(weights)
    keepdim = isinstance(dim, int)
    torch.sum(torch.mul(a, b, out=scratch[2]), dim, keepdim=keepdim, out=out[0])
    torch.sum(a.square_(), dim, keepdim=keepdim, out=out[1])
    torch.sum(b.square_(), dim, keepdim=keepdim, out=out[2])


def _merge_moments(counts: Tensor, sums: Tensor, moments: Tensor, mean: Tensor) -> Tensor:
    """Co-moments about ``mean`` ``(2, C)`` of groups with their own: ``(3, C)`` (Chan et al.).

    Group ``k`` has ``counts[k]`` instances, per-class sums ``sums[k]`` ``(2, C)`` and centred
    co-moments ``moments[k]`` ``(3, C)`` about its own means: each adds those plus
    ``count * (its means - mean)`` products. Exact, and free of the raw moments' cancellation.
    """
    deviation = sums / counts.clamp_min(1.0).view(-1, 1, 1) - mean  # (K, 2, C)
    weighted = deviation * counts.view(-1, 1, 1)
    between = torch.stack([weighted[:, 0] * deviation[:, 1], weighted[:, 0] * deviation[:, 0],
                           weighted[:, 1] * deviation[:, 1]], 1)  # fmt: skip
    return (moments + between).sum(0)


class _RelationTerms(torch.autograd.Function):
    """``(z_s, z_t, keep, tau, sigmoid, global_batch) -> (inter, intra)``; gradient w.r.t. ``z_s``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        z_s: Tensor,
        z_t: Tensor,
        keep: Tensor | None,
        tau: float,
        sigmoid: bool,
        global_batch: bool,
    ) -> tuple[Tensor, Tensor]:
        (n, num_classes, s), dims = z_s.shape, (0, 2)
        dim, spans = _chunk_spans(z_s.shape, z_s.device)
        weights = None if keep is None else keep.to(z_s.dtype)
        scratch_shape = [n, num_classes, s]
        scratch_shape[dim] = spans[0][1]

        def part(x: Tensor, start: int, length: int) -> Tensor:
            return x.narrow(dim, start, length)

        # One sweep over the chunks: probabilities; inter-class moments per instance (over the class
        # dim); per chunk, the count, per-class sums and intra-class moments about the chunk's means.
        probs_s: list[Tensor] = [z_s] * len(spans)  # placeholders, each replaced by its chunk's probabilities
        probs_t: list[Tensor] = [z_s] * len(spans)
        row_stats = z_s.new_empty(3, n, 1, s)
        row_means = z_s.new_empty(2, n, 1, s) if sigmoid else None
        counts, col_sums = z_s.new_empty(len(spans)), z_s.new_empty(len(spans), 2, num_classes)
        col_moments = z_s.new_empty(len(spans), 3, num_classes)

        def sweep(k: int, scratch: Tensor) -> None:
            start, length = spans[k]
            work = scratch.narrow(dim + 1, 0, length)
            keep_part = None if keep is None else part(keep, start, length)
            y_s = _activate(part(z_s, start, length), keep_part, tau, sigmoid, work[0])
            y_t = _activate(part(z_t, start, length), keep_part, tau, sigmoid, work[1])
            if sigmoid:
                means = row_means.narrow(dim + 1, start, length)
                torch.mean(y_s, 1, keepdim=True, out=means[0])
                torch.mean(y_t, 1, keepdim=True, out=means[1])
            else:  # a softmax row sums to 1: its mean is 1 / C
                means = (1.0 / num_classes, 1.0 / num_classes)
            _centred_moments(row_stats.narrow(dim + 1, start, length), y_s, y_t, means, 1, work)
            w = None if weights is None else part(weights, start, length)
            if w is None:
                counts[k] = length * (n if dim == 2 else 1)
                torch.sum(y_s, dims, out=col_sums[k, 0])
                torch.sum(y_t, dims, out=col_sums[k, 1])
            else:
                torch.sum(w, (0, 1, 2), out=counts[k])
                torch.sum(torch.mul(y_s, w, out=work[0]), dims, out=col_sums[k, 0])
                torch.sum(torch.mul(y_t, w, out=work[0]), dims, out=col_sums[k, 1])
            chunk_means = (col_sums[k] / counts[k].clamp_min(1.0)).unsqueeze(-1)  # (2, C, 1)
            _centred_moments(col_moments[k], y_s, y_t, chunk_means, dims, work, w)
            probs_s[k], probs_t[k] = y_s, y_t

        _for_each_chunk(sweep, len(spans), lambda: z_s.new_empty(3, *scratch_shape))
        rho_row, inv_d_row, c_row = _correlation_parts(row_stats)  # each (N, 1, S)

        # Per-class means over the kept instances (of all ranks with global_batch), then the
        # intra-class moments about them.
        local_count = counts.sum()
        totals = torch.cat([col_sums.sum(0).view(-1), local_count.view(1)])
        if global_batch:
            totals = _all_reduce_sum(totals)
        count = totals[-1]
        col_means = (totals[:-1] / count.clamp_min(1.0)).view(2, num_classes)
        moments = _merge_moments(counts, col_sums, col_moments, col_means)
        if global_batch:
            moments = _all_reduce_sum(moments)
        rho_col, inv_d_col, c_col = _correlation_parts(moments.view(3, 1, num_classes, 1))  # each (1, C, 1)

        kept = count > 0
        if weights is None:
            inter = (1.0 - rho_row).mean()
        else:
            inter = ((1.0 - rho_row) * weights).sum() / local_count.clamp_min(1.0)
        intra = (1.0 - rho_col.mean()) * kept.to(rho_col.dtype)
        ctx.save_for_backward(
            weights, inv_d_row, c_row, row_means, col_means.view(2, 1, num_classes, 1), inv_d_col, c_col,
            local_count, kept, *probs_s, *probs_t,
        )  # fmt: skip
        ctx.layout = (z_s.shape, dim, spans, tau, sigmoid, global_batch)
        return inter, intra

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_inter: Tensor, grad_intra: Tensor) -> tuple[Tensor | None, ...]:
        shape, dim, spans, tau, sigmoid, global_batch = ctx.layout
        weights, inv_d_row, c_row, row_means, col_means, inv_d_col, c_col, local_count, kept, *probs = ctx.saved_tensors
        if global_batch:
            grad_intra = _all_reduce_sum(grad_intra.clone())
        # d inter / d rho_i = -w_i / n_local ; d intra / d rho_j = -[n_global > 0] / C; d y / d (z / tau)
        # carries the 1 / tau. Dropped positions get their gradient zeroed at the end.
        k_row = -grad_inter / (local_count.clamp_min(1.0) * tau)
        k_col = -grad_intra * kept.to(grad_intra.dtype) / (shape[1] * tau)
        u_row, v_row = k_row * inv_d_row, k_row * c_row
        u_col, v_col = k_col * inv_d_col, k_col * c_col
        r_col = v_col * col_means[0] - u_col * col_means[1]
        if sigmoid:
            r_row = v_row * row_means[0] - u_row * row_means[1]
        grad = probs[0].new_empty(shape)
        probs_s, probs_t = probs[: len(spans)], probs[len(spans) :]

        def sweep(k: int, scratch: Tensor) -> None:
            (start, length), y_s, y_t = spans[k], probs_s[k], probs_t[k]
            u_part, v_part = u_row.narrow(dim, start, length), v_row.narrow(dim, start, length)
            # g = dL/dy_s = y_t * (u_row + u_col) - y_s * (v_row + v_col) + r_row + r_col
            g = torch.addcmul(r_col, y_t, u_part, out=scratch.narrow(dim, 0, length)).addcmul_(y_t, u_col)
            g.addcmul_(y_s, v_part, value=-1.0).addcmul_(y_s, v_col, value=-1.0)
            if sigmoid:
                g.add_(r_row.narrow(dim, start, length))
            out = torch.mul(g, y_s, out=grad.narrow(dim, start, length))
            if sigmoid:  # g * y * (1 - y)
                out.addcmul_(out, y_s, value=-1.0)
            else:  # y * (g - <g, y>)
                out.addcmul_(y_s, out.sum(1, keepdim=True), value=-1.0)
            if weights is not None:
                out.mul_(weights.narrow(dim, start, length))

        _for_each_chunk(sweep, len(spans), lambda: probs_s[0].new_empty(probs_s[0].shape))
        return grad, None, None, None, None, None


def relation_terms(
    z_s: Tensor,
    z_t: Tensor,
    keep: Tensor | None,
    *,
    tau: float = 1.0,
    activation: str = "softmax",
    global_batch: bool = False,
) -> tuple[Tensor, Tensor]:
    """DIST's ``(inter, intra)`` terms of logits ``(N, C, S)``; ``keep``: bool ``(N, 1, S)`` or None.

    ``activation``: ``"softmax"`` over dim 1 or ``"sigmoid"``, at temperature ``tau``.
    ``global_batch`` sums the intra term's statistics over all ranks (when a process group with
    more than one rank is initialised). A term with no kept instance is 0. Positions ``keep``
    drops take no part in value or gradient, whatever they hold.
    """
    global_batch = global_batch and _world_size() > 1
    return _RelationTerms.apply(z_s, z_t.detach(), keep, tau, activation == "sigmoid", global_batch)


def reference_terms(
    z_s: Tensor, z_t: Tensor, keep: Tensor | None, *, tau: float = 1.0, activation: str = "softmax"
) -> tuple[Tensor, Tensor]:
    """The same ``(inter, intra)`` as :func:`relation_terms`, in plain autograd: the readable reference.

    Logits ``(N, C, S)``, ``keep`` bool ``(N, 1, S)`` or None; the local batch only. It builds a few centred
    input-sized copies and lets autograd save what it needs (more memory and kernels than the fast path);
    it runs on every device and has second derivatives.
    """
    if keep is not None:
        zero = z_s.new_zeros(())
        z_s, z_t = torch.where(keep, z_s, zero), torch.where(keep, z_t, zero)
    scaled_s, scaled_t = z_s / tau, z_t.detach() / tau
    y_s, y_t = (scaled_s.sigmoid(), scaled_t.sigmoid()) if activation == "sigmoid" else (
        scaled_s.softmax(1), scaled_t.softmax(1))
    num_classes = y_s.shape[1]
    # Instances as rows (M, C): position s of sample n is row n * S + s.
    rows_s, rows_t = y_s.transpose(1, 2).reshape(-1, num_classes), y_t.transpose(1, 2).reshape(-1, num_classes)
    kept = torch.ones(rows_s.shape[0], dtype=torch.bool, device=z_s.device) if keep is None else keep.reshape(-1)
    rows_s, rows_t = rows_s[kept], rows_t[kept]
    if rows_s.shape[0] == 0:
        zero = (z_s * 0).sum()  # keeps the graph: a zero gradient
        return zero, zero
    inter = 1.0 - _pearson(rows_s, rows_t, dim=1).mean()
    intra = 1.0 - _pearson(rows_s, rows_t, dim=0).mean()
    return inter, intra


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``rho`` of ``a`` and ``b`` ``(M, C)`` along ``dim`` (the module docstring's formula)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)

