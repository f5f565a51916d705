"""CRD on two gloo processes keeps the buffers of one process training on the global batch: identical memory banks,
label tables and Z on every rank, equal to the single-process ones, and the mean of the ranks' losses equals the
single-process loss (with the same contrast rows)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distkd.losses import build_loss
from distkd.losses.crd import gather_rows

WORLD_SIZE = 2
DATASET, K, STEPS = 20, 4, 2


def steps() -> list[dict[str, torch.Tensor]]:
    """Global batches of 8: features, sample positions, labels and the contrast rows (positive first)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        index = torch.randperm(DATASET, generator=generator)[:8]
        negatives = torch.randint(DATASET, (8, K), generator=generator)
        student, teacher = torch.randn(8, 6, generator=generator), torch.randn(8, 5, generator=generator)
        out.append({"student": student, "teacher": teacher,
                    "index": index, "target": torch.randint(3, (8,), generator=generator),
                    "contrast_index": torch.cat([index.unsqueeze(1), negatives], dim=1)})
    return out


def run(rank: int | None) -> dict[str, torch.Tensor]:
    """Train CRD on ``steps()`` (rank ``r``: its half of each batch; None: the whole batch); return its state."""
    torch.manual_seed(1)  # the heads' initialisation, equal in every process
    loss = build_loss("crd", feat_dim=3, nce_k=K)
    loss.probe(torch.randn(2, 6), torch.randn(2, 5), dataset_size=DATASET)
    losses = []
    for batch in steps():
        part = batch if rank is None else {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
        value = loss(part["student"], part["teacher"], index=part["index"], target=part["target"],
                     contrast_index=part["contrast_index"])
        losses.append(value.detach())
    return {**{k: v.clone() for k, v in loss.state_dict().items() if "embed" not in k}, "losses": torch.stack(losses)}


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(run(rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_crd_buffers_under_ddp_equal_one_process_on_the_global_batch(tmp_path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    single = run(None)
    for name in ("memory_student", "memory_teacher", "labels", "z", "draws"):
        for state in ranks:
            torch.testing.assert_close(state[name], single[name], rtol=1e-6, atol=1e-7)
    seen = {int(i): int(t) for batch in steps() for i, t in zip(batch["index"], batch["target"], strict=True)}
    assert {i: int(single["labels"][i]) for i in seen} == seen  # every rank's samples reached the table
    mean_loss = sum(state["losses"] for state in ranks) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["losses"], rtol=1e-5, atol=1e-6)


def test_gather_rows_without_a_process_group_is_the_identity() -> None:
    x = torch.randn(3, 2)
    assert gather_rows(x) is x
