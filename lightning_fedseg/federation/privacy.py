"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with opacus's accountant.

Each site's update ``y_i - x_t`` is clipped to L2 norm ``clip_norm`` (over every floating tensor
of the state together); Gaussian noise ``N(0, (noise_multiplier * clip_norm)**2)`` is added to the
sum of the clipped updates, and the sum is divided by a fixed denominator, the expected number of
sites per round ``q * N`` (not by the sites' sample counts: data-dependent weights would let one
site move the result by more than ``clip_norm`` and void the sensitivity bound). Privacy is at the
level of a site (an institution), not of a patient.

What is privatized: every floating tensor of the state, parameters *and* buffers (BatchNorm
running statistics are computed from the data too), as one vector. Integer buffers
(``num_batches_tracked``) would reveal a site's batch count: they are not updated (the global
model keeps its own). On torch.distributed no process is a server: each adds its share of the
noise, ``N(0, sigma**2 C**2 / world_size)``, to its own sum before the all-reduce, so the total has
the right variance and no process ever holds an un-noised sum of others' updates (with masked
aggregation, not even of one other process's).

Privacy is accounted by opacus (``rdp`` or ``prv``) with the site sampling rate ``q`` (FedAvg's
``fraction``); ``privacy/epsilon`` at ``delta`` is logged every round; ``target_epsilon`` stops
training at the end of the last round that keeps epsilon within it.

Adaptive clipping (Andrew et al., NeurIPS 2021), with ``target_unclipped_quantile`` ``gamma``: each
site also reports ``b_i = 1[||Delta_i|| <= C]``; the sum of the ``b_i`` gets Gaussian noise of
standard deviation ``count_stddev`` ``sigma_b`` (default ``q N / 20``, the paper's) and the fixed
denominator, ``b = (sum b_i + N(0, sigma_b^2)) / (q N)``, and the next round clips at
``C exp(-clip_learning_rate * (b - gamma))``. The updates' noise multiplier becomes
``sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2``, so that the two releases together are one
Gaussian mechanism of noise multiplier ``sigma`` (their Theorem 1): the accounting is unchanged.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_fedseg.federation.aggregate import IntegerPolicy, WeightedMean, check_finite
from lightning_fedseg.federation.aggregators import Aggregator
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.server import ServerStep

if TYPE_CHECKING:
    from lightning_fedseg.federation.transport import CommStats, Transport

__all__ = ["ClippedSumAggregator", "DPFedAvg", "clip_update"]

State = Mapping[str, Tensor]


def clip_update(state: State, global_state: State, clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """The update ``state - global`` of the floating tensors, scaled to L2 norm at most ``clip_norm``
    (integer tensors: zeros); also returns the update's norm before clipping.

    Example:
        >>> update, norm = clip_update({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, clip_norm=1.0)
        >>> update["w"].tolist(), norm
        ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    delta = {k: (v.detach().double() - global_state[k].detach().double().to(v.device)) for k, v in state.items()}
    floats = [d for k, d in delta.items() if state[k].is_floating_point()]
    norm = float(torch.sqrt(sum((d.square().sum() for d in floats), torch.zeros((), dtype=torch.float64))))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            out[key] = (delta[key] * factor).to(value.dtype)
        else:
            out[key] = torch.zeros_like(value)
    return out, norm


class DPFedAvg(ServerStep):
    """DP-FedAvg: clipped site updates, Gaussian noise on their sum, a fixed denominator.

    Args:
        clip_norm: ``C``, the L2 bound of one site's update.
        noise_multiplier: ``sigma``; the noise on the sum has standard deviation ``sigma * C``.
        delta: the ``delta`` at which epsilon is reported.
        target_epsilon: stop at the end of the last round that keeps epsilon within it (``None``: never).
        accountant: ``"rdp"`` or ``"prv"`` (opacus).
        noise_seed: seed the noise (for tests and reproductions only: whoever knows the seed can
            remove the noise). Default: fresh operating-system randomness every round.
        target_unclipped_quantile: ``gamma`` of adaptive clipping (Andrew et al.): the share of sites
            whose update should fit within the clipping norm, e.g. 0.5; ``None``: a fixed ``clip_norm``
            (which is then the initial norm of adaptive clipping).
        clip_learning_rate: ``eta_C``, the geometric step of the clipping norm per round.
        count_stddev: ``sigma_b``, the noise on the count of unclipped sites (default ``q N / 20``).
        optimizer: a FedAvg-family server step (FedAvgM, FedAdam, FedYogi, FedAdagrad) applied to the
            noised aggregate (post-processing: the privacy guarantee is unchanged); robust rules,
            which need every site's own state, cannot follow DP.
    """

    differentially_private = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
        noise_seed: int | None = None,
        optimizer: ServerStep | None = None,
        target_unclipped_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        count_stddev: float | None = None,
    ) -> None:
        super().__init__()
        if optimizer is not None and (optimizer.needs_site_states or isinstance(optimizer, DPFedAvg)):
            raise ValueError(
                f"Expected `optimizer` to be a FedAvg-family server step, but got {optimizer!r}: it needs"
                " every site's own state, which DP-FedAvg never forms."
            )
        self.optimizer = optimizer
        for name, value in (("clip_norm", clip_norm), ("delta", delta)):
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"Expected `{name}` to be positive, but got {value!r}.")
        if not (isinstance(noise_multiplier, int | float) and noise_multiplier >= 0):
            raise ValueError(f"Expected `noise_multiplier` to be non-negative, but got {noise_multiplier!r}.")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"Expected `target_epsilon` to be positive, but got {target_epsilon!r}.")
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"Expected `accountant` to be 'rdp' or 'prv', but got {accountant!r}.")
        if target_unclipped_quantile is not None and not 0.0 < target_unclipped_quantile < 1.0:
            raise ValueError(f"Expected `target_unclipped_quantile` in (0, 1), but got {target_unclipped_quantile!r}.")
        if not clip_learning_rate > 0 or (count_stddev is not None and not count_stddev >= 0):
            raise ValueError(
                f"Expected a positive `clip_learning_rate` and a non-negative `count_stddev`, but got"
                f" {clip_learning_rate!r} and {count_stddev!r}."
            )
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clip_learning_rate = float(clip_learning_rate)
        self.count_stddev = count_stddev
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.target_epsilon = target_epsilon
        self.accountant_name = accountant
        self.noise_seed = noise_seed
        self.num_sites = 0
        self.sample_rate = 1.0
        self.history: list[list[float]] = []  # [noise multiplier, sample rate, rounds]

    def setup(self, param_keys: Any) -> None:
        super().setup(param_keys)
        if self.optimizer is not None:
            self.optimizer.setup(param_keys)

    def setup_federation(
        self, num_sites: int, sample_rate: float, sites_per_round: int = 0, sites: Sequence[str] = ()
    ) -> None:
        """The federation's size ``N`` and the site sampling rate ``q``."""
        self.num_sites, self.sample_rate = int(num_sites), float(sample_rate)
        if self.adaptive and self.noise_multiplier > 0 and not 2 * self.count_sigma > self.noise_multiplier:
            raise ValueError(
                f"Adaptive clipping needs 2 * count_stddev > noise_multiplier, but the count's noise"
                f" {self.count_sigma:.3g} (q N / 20 unless `count_stddev` is given) is too small for"
                f" noise_multiplier={self.noise_multiplier}: the updates' noise would have to be infinite."
                f" HINT: raise `count_stddev` above {self.noise_multiplier / 2:.3g} (it costs some of the budget)."
            )
        if self.target_epsilon is not None and self.epsilon(extra_rounds=1) > self.target_epsilon:
            raise ValueError(
                f"One round of DP-FedAvg with noise_multiplier={self.noise_multiplier} and sampling rate"
                f" {self.sample_rate} already spends epsilon {self.epsilon(extra_rounds=1):.3g} at delta={self.delta},"
                f" more than target_epsilon={self.target_epsilon}. HINT: raise `noise_multiplier`."
            )

    # ------------------------------------------------------------------ accounting
    def _accountant(self, extra_rounds: int = 0) -> Any:
        from opacus.accountants import PRVAccountant, RDPAccountant

        accountant = RDPAccountant() if self.accountant_name == "rdp" else PRVAccountant()
        history = [tuple(h) for h in self.history]
        if extra_rounds:
            history.append((self.noise_multiplier, self.sample_rate, extra_rounds))
        accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
        return accountant

    def epsilon(self, extra_rounds: int = 0) -> float:
        """Epsilon at ``delta`` after the rounds so far (and ``extra_rounds`` more)."""
        if not self.history and not extra_rounds:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self._accountant(extra_rounds).get_epsilon(delta=self.delta))

    def would_exceed(self) -> bool:
        """Whether one more round would take epsilon past ``target_epsilon``."""
        return self.target_epsilon is not None and self.epsilon(extra_rounds=1) > self.target_epsilon

    def stop_reason(self) -> str | None:
        if self.would_exceed():
            return f"one more round would exceed the privacy budget (target_epsilon={self.target_epsilon})"
        return None

    def aggregator(self, integer_policy: IntegerPolicy | str, masked: bool, site_names: Sequence[str]) -> Aggregator:
        return ClippedSumAggregator(self, masked)

    def metrics(self) -> dict[str, float]:
        out = {"privacy/epsilon": self.epsilon()}
        if self.adaptive:
            out["privacy/clip_norm"] = self.clip_norm
        return out

    # ------------------------------------------------------------------ adaptive clipping
    COUNT_KEY = "__dp_unclipped_sites__"

    @property
    def adaptive(self) -> bool:
        return self.target_unclipped_quantile is not None

    @property
    def count_sigma(self) -> float:
        """``sigma_b``, the noise on the count of unclipped sites."""
        if self.count_stddev is not None:
            return float(self.count_stddev)
        return self.sample_rate * self.num_sites / 20

    @property
    def update_noise_multiplier(self) -> float:
        """``sigma_Delta``: ``sigma`` itself, or ``(sigma^-2 - (2 sigma_b)^-2)^-1/2`` with adaptive clipping.

        Example:
            >>> DPFedAvg(noise_multiplier=2.0, target_unclipped_quantile=0.5, count_stddev=5.0).update_noise_multiplier
            2.041241452319315
        """
        sigma = self.noise_multiplier
        if not self.adaptive or sigma == 0:
            return sigma
        return (sigma**-2 - (2 * self.count_sigma) ** -2) ** -0.5

    def extra_sums(self) -> dict[str, Tensor]:
        """The sums beside the model's that the round adds up (the count of unclipped sites)."""
        return {self.COUNT_KEY: torch.zeros((), dtype=torch.float64)} if self.adaptive else {}

    # ------------------------------------------------------------------ the round
    def clip(self, state: State, global_state: State) -> dict[str, Tensor]:
        """A site's clipped update (with adaptive clipping, and its 0/1 "fits within the norm")."""
        update, norm = clip_update(state, global_state, self.clip_norm)
        if self.adaptive:
            device = next(iter(update.values())).device
            update[self.COUNT_KEY] = torch.tensor(
                1.0 if norm <= self.clip_norm else 0.0, dtype=torch.float64, device=device
            )
        return update

    def noise_share(
        self, sums: Mapping[str, Tensor], global_state: State, world_size: int, rank: int, round_idx: int
    ) -> dict[str, Tensor]:
        """This process's sum plus its share ``N(0, sigma^2 C^2 / world_size)`` of the noise, on the
        keys that are floating tensors of the model (one draw per tensor, in state order)."""
        seed = secrets.randbits(63) if self.noise_seed is None else derive_seed(self.noise_seed, round_idx, rank)
        generator = torch.Generator().manual_seed(seed)
        std = self.update_noise_multiplier * self.clip_norm / math.sqrt(world_size)
        out = {}
        for key, value in sums.items():
            if key == self.COUNT_KEY:
                continue
            if global_state[key].is_floating_point():
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)  # drawn on the CPU
                value = value + std * noise.to(value.device)
            out[key] = value
        if self.adaptive:
            count = sums.get(self.COUNT_KEY, torch.zeros((), dtype=torch.float64))
            noise = self.count_sigma / math.sqrt(world_size) * torch.randn((), generator=generator, dtype=torch.float64)
            out[self.COUNT_KEY] = count + noise.to(count.device)
        return out

    def step_from_sum(self, global_state: State, noisy_sum: State, round_idx: int) -> dict[str, Tensor]:
        """``x + (sum of clipped updates + noise) / (q N)``; integer buffers keep the global value."""
        denominator = self.sample_rate * self.num_sites
        if self.adaptive:  # the next round's norm, from this round's noised share of unclipped sites
            assert self.target_unclipped_quantile is not None
            unclipped = float(noisy_sum[self.COUNT_KEY]) / denominator
            self.clip_norm *= math.exp(-self.clip_learning_rate * (unclipped - self.target_unclipped_quantile))
        out = {}
        for key, x in global_state.items():
            if x.is_floating_point():
                out[key] = (x.double() + noisy_sum[key].double().to(x.device) / denominator).to(x.dtype)
            else:
                out[key] = x.clone()
        if self.history and self.history[-1][:2] == [self.noise_multiplier, self.sample_rate]:
            self.history[-1][2] += 1
        else:
            self.history.append([self.noise_multiplier, self.sample_rate, 1])
        if self.optimizer is not None:
            out = self.optimizer.step(global_state, out, round_idx)
        return out

    def step(self, global_state: State, aggregate_state: State, round_idx: int) -> dict[str, Tensor]:
        raise TypeError("DPFedAvg works on the noised sum of clipped updates: the engine calls `step_from_sum`.")

    def state_dict(self) -> dict[str, Any]:
        inner = self.optimizer.state_dict() if self.optimizer is not None else {}
        return {"history": [list(h) for h in self.history], "optimizer": inner, "clip_norm": self.clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [list(h) for h in state["history"]]
        self.clip_norm = float(state.get("clip_norm", self.clip_norm))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return f"DPFedAvg(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier})"


class ClippedSumAggregator(Aggregator):
    """DP-FedAvg's round: each site's clipped update with weight 1 (a fixed denominator), each
    process's share of the noise on its own sum, one (optionally masked) all-reduce, the step."""

    def __init__(self, server: DPFedAvg, masked: bool = False) -> None:
        super().__init__()
        self.server = server
        self.masked = masked
        self.accumulator = WeightedMean(IntegerPolicy.MEAN)

    def start(self, global_state: dict[str, Tensor]) -> None:
        super().start(global_state)
        self.accumulator.reset()

    def add(self, site: str, index: int, state: Mapping[str, Tensor], weight: float) -> None:
        check_finite(state, site)
        self.accumulator.add(self.server.clip(state, self.global_state), 1.0, site)
        self.count += 1

    def combine(
        self, transport: Transport, stats: CommStats, round_idx: int, min_sites: int
    ) -> tuple[dict[str, Tensor] | None, int]:
        server, global_state = self.server, self.global_state
        sums, total = self.accumulator.sums()
        # Each process adds its share of the noise to its own sum (and the count of unclipped sites).
        reference = {**global_state, **server.extra_sums()}
        zeros = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in reference.items()}
        sums = server.noise_share({**zeros, **sums}, global_state, transport.world_size, transport.rank, round_idx)
        sums, total, succeeded = transport.all_reduce_sums(
            sums, total, self.count, reference, stats, round_idx, masked=self.masked
        )
        if succeeded < min_sites:
            return None, succeeded
        return server.step_from_sum(global_state, sums, round_idx), succeeded
