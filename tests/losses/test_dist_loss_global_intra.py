"""DIST(global_intra=True) on two gloo processes equals the single-process loss on the full batch.

Gradient convention: each rank's gradient w.r.t. its local logits is ``world_size`` times the
matching slice of the full-batch gradient, so DDP's mean over ranks yields the full-batch gradient.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distkd.losses import DIST

WORLD_SIZE = 2


def batches() -> dict[str, dict[str, torch.Tensor | None]]:
    """Full batches: a 2-D one without mask, and a dense one whose mask keeps unequal counts per half."""
    generator = torch.Generator().manual_seed(0)
    flat_s = 3 * torch.randn(8, 5, generator=generator, dtype=torch.float64)
    flat_t = 3 * torch.randn(8, 5, generator=generator, dtype=torch.float64)
    dense_s = 3 * torch.randn(4, 3, 4, 4, generator=generator, dtype=torch.float64)
    dense_t = 3 * torch.randn(4, 3, 4, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 4, 4, generator=generator) > 0.3
    mask[2:, :2] = False
    return {
        "flat": {"student": flat_s, "teacher": flat_t, "mask": None, "beta": 1.0},
        "dense": {"student": dense_s, "teacher": dense_t, "mask": mask, "beta": 0.0},
    }


def local_slice(tensor: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    half = tensor.shape[0] // WORLD_SIZE
    return tensor[rank * half : (rank + 1) * half]


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name, case in batches().items():
            student = local_slice(case["student"], rank).clone().requires_grad_()
            loss, parts = DIST(beta=case["beta"], gamma=1.5, tau=2.0, global_intra=True)(
                student, local_slice(case["teacher"], rank), mask=local_slice(case["mask"], rank), return_parts=True
            )
            loss.backward()
            results[name] = {"loss": loss.detach(), "intra": parts["intra"], "grad": student.grad}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_global_intra_on_two_processes_matches_the_full_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for name, case in batches().items():
        student = case["student"].clone().requires_grad_()
        loss, parts = DIST(beta=case["beta"], gamma=1.5, tau=2.0)(
            student, case["teacher"], mask=case["mask"], return_parts=True
        )
        loss.backward()
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result[name]["intra"], parts["intra"], rtol=1e-12, atol=1e-12)
            expected_grad = WORLD_SIZE * local_slice(student.grad, rank)
            torch.testing.assert_close(result[name]["grad"], expected_grad, rtol=1e-10, atol=1e-12)
        mean_loss = sum(result[name]["loss"] for result in ranks) / WORLD_SIZE
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=1e-12)


def test_global_intra_without_process_group_is_the_local_loss():
    case = batches()["flat"]
    local = DIST(tau=2.0)(case["student"], case["teacher"])
    assert torch.equal(DIST(tau=2.0, global_intra=True)(case["student"], case["teacher"]), local)
