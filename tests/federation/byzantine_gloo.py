"""One rank of the two-process check: each draws the Byzantine sites and the Gaussian attack's noise,
the ranks exchange them over gloo (loopback) and each checks that they agree.

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.federation.byzantine_gloo
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_fedseg.federation.byzantine import ByzantineServer, SiteAttack
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.server import FedAvgStep

SITES = [f"hospital-{i}" for i in range(32)]


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    site_side = SiteAttack("gaussian", num_byzantine=8, seed=11).choice.choose(SITES)
    server_side = ByzantineServer(FedAvgStep(), "alie", num_byzantine=8, seed=11).choice.choose(SITES)
    assert site_side == server_side, (site_side, server_side)
    mine = torch.tensor([SITES.index(s) for s in site_side])
    noise = torch.randn(4, generator=torch.Generator().manual_seed(derive_seed(11, 3, SITES.index(site_side[0]), 26)))
    gathered = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(gathered, mine)
    noises = [torch.zeros_like(noise) for _ in range(2)]
    dist.all_gather(noises, noise)
    assert torch.equal(gathered[0], gathered[1]) and torch.equal(noises[0], noises[1])
    print("chosen", list(site_side))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
