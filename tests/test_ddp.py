"""SeD under DistributedDataParallel: gloo, 2 spawned CPU processes (no GPU needed).

One process group, a DDP-wrapped SeD driven through SeDAdversary (G step, then a D step with
two forwards, real and fake, and one backward) and a DDP-wrapped toy generator. Afterwards every
D parameter, every spectral-norm buffer and every G parameter must be identical on both ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD_SIZE = 2
STEPS = 2
VARIANTS = ("patch", "pixel")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import sed_discriminator as sd

    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        extractor = sd.SemanticExtractor("clip_rn50", pretrained=None)
        for variant in VARIANTS:
            _train(rank, variant, extractor, Path(out_dir))
    finally:
        dist.destroy_process_group()
    # Everything is written: skip the interpreter's teardown, where gloo's threads now and then
    # abort the process ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train(rank: int, variant: str, extractor, out_dir: Path) -> None:
    import sed_discriminator as sd

    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    d = sd.SeD(variant, width=8, semantic_channels=1024, head_dim=8)
    g = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    ddp_d, ddp_g = DDP(d), DDP(g)
    initial = _flat(d.parameters()).clone()
    adversary = sd.SeDAdversary(ddp_d, extractor=extractor, weight=0.01)
    opt_d = torch.optim.Adam(ddp_d.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(ddp_g.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batch
    losses = []
    for _ in range(STEPS):
        lr = torch.rand(2, 3, 32, 32, generator=data)
        hr = torch.rand(2, 3, 32, 32, generator=data)
        # G step: D is frozen inside generator_loss.
        sr = ddp_g(lr)
        g_loss = adversary.generator_loss(sr, hr)
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        g_loss.backward()
        assert all(p.grad is None for p in d.parameters())
        opt_g.step()
        # D step: two forwards (real, fake), one backward.
        d_loss = adversary.discriminator_loss(sr, hr)
        d_loss.backward()
        assert all(p.grad is not None for p in d.parameters())
        opt_d.step()
        losses.append(d_loss.item())
    state = {
        "d_params": _flat(d.parameters()),
        "d_sn_buffers": _flat(b for n, b in d.named_buffers() if n.endswith(("._u", "._v"))),
        "g_params": _flat(g.parameters()),
        "losses": torch.tensor(losses),
    }
    gathered = {}
    for key, value in state.items():
        parts = [torch.empty_like(value) for _ in range(WORLD_SIZE)]
        dist.all_gather(parts, value)
        gathered[key] = parts
    if rank == 0:
        torch.save({"gathered": gathered, "initial": initial}, out_dir / f"{variant}.pt")


def _spawn(out_dir: Path, timeout: float = 240.0) -> None:
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"DDP workers did not finish within {timeout} s")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_gloo_two_ranks_stay_in_sync(tmp_path: Path) -> None:
    _spawn(tmp_path)
    for variant in VARIANTS:
        result = torch.load(tmp_path / f"{variant}.pt", weights_only=True)
        gathered = result.pop("gathered")
        losses = gathered.pop("losses")
        for key, (rank0, rank1) in gathered.items():
            assert torch.equal(rank0, rank1), f"{variant}: {key} differ across ranks"
        assert not torch.equal(gathered["d_params"][0], result["initial"]), variant  # the steps did something
        assert not torch.equal(losses[0], losses[1]), variant  # the ranks trained on different data
