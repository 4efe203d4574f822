"""Seeds: derive one per round and site from the base seed, and seed torch's generators with it.

Every process of a federation (simulation, one rank per site, one institution over FLARE)
derives the same seed for the same round and site from the run's base seed, so a site's draws
do not depend on which process trains it or what trained before it there.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["derive_seed", "seed_torch"]


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed derived from integers (base seed, round, site, ...), stable across processes.

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the generators a fit can draw from: the CPU's, and each
    accelerator's that is initialized (or MPS's).

    Not ``torch.manual_seed``: it also queues the seed, with a formatted stack, for every
    accelerator not yet initialized, a cost paid at every site hand-over; a fit's accelerator is
    initialized before its first site starts, so seeding the initialized ones is enough.

    Example:
        >>> seed_torch(3)
        >>> a = torch.rand(2)
        >>> _ = torch.manual_seed(3)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_initialized():
        xpu.manual_seed_all(seed)
