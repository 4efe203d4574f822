"""Tests for the seeds a federation derives per round and site."""

from __future__ import annotations

import torch

from lightning_fedseg.federation import modes
from lightning_fedseg.federation.seeding import derive_seed, seed_torch


def test_derive_seed_is_stable_and_order_sensitive() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert 0 <= derive_seed(7) < 2**32


def test_seed_torch_reproduces_the_cpu_draws() -> None:
    seed_torch(3)
    first = torch.rand(4)
    seed_torch(3)
    assert torch.equal(first, torch.rand(4))
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(4))


def test_the_old_import_path_still_works() -> None:
    assert modes.derive_seed is derive_seed and modes.seed_torch is seed_torch
