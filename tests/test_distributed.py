"""Two CPU processes (gloo) compute the distance and the matching loss of the global batch.

On 2 processes x batch B the distribution-matching term, and the gradient it sends to each process's
embeddings (after DDP's averaging), equal those of 1 process x batch 2B.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmssl.distances import build_distance
from dmssl.objective import DistributionMatching, StepEmbeddings

WORLD = 2
DISTANCES = [("mmd", {"kernel": "gaussian"}), ("wasserstein", {"method": "sliced", "num_projections": 16}),
             ("cosine", {})]


def global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labeled = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    weak = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    return labeled, weak


def matching(name, options, labeled, weak, step=3):
    objective = DistributionMatching(DistributionMatching.Options(lambda_dm=2.0), 3, build_distance(name, **options),
                                     seed=5)
    emb = StepEmbeddings(labeled=labeled, labels=torch.zeros(len(labeled), dtype=torch.long),
                         prototypes=torch.eye(3, 6), weak=weak)
    return objective.match(emb, torch.zeros(len(weak), dtype=torch.long), torch.zeros(len(weak), dtype=torch.bool), step)


def worker(rank, init_file, out_file, name, options):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    labeled, weak = global_batch()
    # Uneven shares on purpose: rank 0 holds 3 labeled rows, rank 1 holds 5.
    labeled_rows = slice(0, 3) if rank == 0 else slice(3, 8)
    weak_rows = slice(0, 6) if rank == 0 else slice(6, 12)
    x = labeled[labeled_rows].clone().requires_grad_()
    y = weak[weak_rows].clone().requires_grad_()
    value = matching(name, options, x, y)
    value.backward()
    # DDP averages gradients over processes: emulate it for the local rows.
    torch.save({"value": value.detach(), "x_grad": x.grad / WORLD, "y_grad": y.grad / WORLD,
                "rows": (labeled_rows, weak_rows)}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize(("name", "options"), DISTANCES)
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, name, options):
    labeled, weak = global_batch()
    x, y = labeled.clone().requires_grad_(), weak.clone().requires_grad_()
    expected = matching(name, options, x, y)
    expected.backward()
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path / "out"), name, options), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=False)
        labeled_rows, weak_rows = got["rows"]
        assert torch.allclose(got["value"], expected.detach(), atol=1e-6)
        # Each process back-propagates the same global D; the gather's backward sums the W contributions
        # for the local rows and DDP divides by W: the update is exactly the single-process one.
        assert torch.allclose(got["x_grad"], x.grad[labeled_rows], atol=1e-6)
        assert torch.allclose(got["y_grad"], y.grad[weak_rows], atol=1e-6)


def probing_worker(rank, init_file, out_file):
    # A short collective timeout: a probe that called one would fail here in seconds, not hang the suite.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=20))
    from dmssl.objective import build_objective
    from dmssl.trainer import step_timer
    from tests.tiny_models import tiny_model, tiny_step_batch

    torch.manual_seed(0)
    model, batch = tiny_model(), tiny_step_batch()
    objective = build_objective("dmssl", None, 3, build_distance("mmd"))
    measure = step_timer(model, objective, lambda: batch, 0, torch.device("cpu"))
    # The processes time different numbers of steps, as probes on clocks of their own do.
    for _ in range(3 if rank == 0 else 1):
        measure("no")
    dist.barrier()  # the group still works: no collective of a probe is left waiting
    torch.save({"done": True}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_precision_probe_calls_no_collective(tmp_path):
    mp.spawn(probing_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    assert all(torch.load(f"{tmp_path / 'out'}.{rank}")["done"] for rank in range(WORLD))
