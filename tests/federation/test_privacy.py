"""DP-FedAvg and masked aggregation: hand-computed rounds, the accountant, the masks' algebra."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from lightning_fedseg import FedAvg
from lightning_fedseg.federation import SCAFFOLD, DPFedAvg, UnsupportedFeatureError
from lightning_fedseg.federation.masking import RoundKeys, decode, encode, mask, quantization_bound
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.privacy import clip_update
from tests.federation.test_algorithms import alone, federate, initial


def test_clipping_scales_the_whole_update_to_the_norm():
    state = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}
    zero = {"w": torch.zeros(2), "b": torch.zeros(1), "n": torch.tensor(2)}
    update, norm = clip_update(state, zero, clip_norm=2.0)
    assert norm == 5.0
    torch.testing.assert_close(update["w"], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(update["b"], torch.tensor([1.6]))
    assert update["n"].item() == 0  # integer buffers are not updated
    small, norm = clip_update({"w": torch.tensor([0.3])}, {"w": torch.zeros(1)}, clip_norm=2.0)
    assert norm == pytest.approx(0.3) and small["w"].item() == pytest.approx(0.3)


def test_one_dp_round_by_hand(tmp_path):
    """x1 = x0 + (sum of clipped site updates + N(0, (sigma C)^2)) / (q N), with a fixed noise seed."""
    init = initial()
    clip, sigma, seed = 0.5, 0.3, 11
    trained = alone(tmp_path / "alone", init)
    clipped = [clip_update(s, init, clip)[0] for s in trained]
    generator = torch.Generator().manual_seed(derive_seed(seed, 0, 0))
    expected = {}
    for key, x in init.items():  # state-dict order, one draw per floating tensor
        if not x.is_floating_point():
            expected[key] = x
            continue
        total = sum(c[key].double() for c in clipped)
        noise = sigma * clip * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        expected[key] = (x.double() + (total + noise) / 3).float()
    dp = DPFedAvg(clip_norm=clip, noise_multiplier=sigma, noise_seed=seed)
    strategy, fed = federate(tmp_path / "fed", init=init, server=dp)
    for key, value in expected.items():
        torch.testing.assert_close(fed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    reference = RDPAccountant()
    reference.step(noise_multiplier=sigma, sample_rate=1.0)
    assert strategy.history[0]["privacy/epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))


def test_adaptive_clipping_round_by_hand(tmp_path):
    """Andrew et al. without noise: the round clips at C0; the next norm is C0 exp(-eta (b - gamma)),
    b the share of sites whose update fits within C0 (here 2 of 3: the norm is the middle one's)."""
    init = initial()
    trained = alone(tmp_path / "alone", init)
    norms = sorted(clip_update(s, init, 1.0)[1] for s in trained)
    c0, gamma, eta = norms[1], 0.9, 0.2
    clipped = [clip_update(s, init, c0)[0] for s in trained]
    dp = DPFedAvg(clip_norm=c0, noise_multiplier=0.0, target_unclipped_quantile=gamma, clip_learning_rate=eta,
                  count_stddev=0.0)  # fmt: skip
    strategy, fed = federate(tmp_path / "fed", init=init, server=dp)
    for key, x in init.items():
        expected = x if not x.is_floating_point() else (x.double() + sum(c[key].double() for c in clipped) / 3).float()
        torch.testing.assert_close(fed.state_dict()[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    c1 = c0 * math.exp(-eta * (2 / 3 - gamma))
    assert strategy.history[0]["privacy/clip_norm"] == pytest.approx(c1)
    restored = DPFedAvg(clip_norm=1.0, target_unclipped_quantile=gamma)
    restored.load_state_dict(dp.state_dict())  # a resumed run clips at the norm it had reached
    assert restored.clip_norm == pytest.approx(c1)


def test_adaptive_clipping_splits_the_noise_between_updates_and_count():
    """sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2 on the updates, sigma_b on the count, each shared
    over the processes; the count's default noise is q N / 20, refused where it cannot be afforded."""
    dp = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, target_unclipped_quantile=0.5, count_stddev=4.0, noise_seed=3)
    dp.setup_federation(num_sites=40, sample_rate=1.0)
    sigma_delta = (1.5**-2 - 8.0**-2) ** -0.5
    assert dp.update_noise_multiplier == pytest.approx(sigma_delta)
    zero = {"w": torch.zeros(20000, dtype=torch.float64)}
    draws = [dp.noise_share({**zero, **dp.extra_sums()}, zero, world_size=4, rank=r, round_idx=i)
             for i in range(500) for r in range(4)]  # fmt: skip
    total = torch.stack([d["w"] for d in draws[:4]]).sum(0)  # one round: the four processes' shares
    assert total.var().item() == pytest.approx((sigma_delta * 2.0) ** 2, rel=0.05)
    counts = torch.stack([d[DPFedAvg.COUNT_KEY] for d in draws]).view(500, 4).sum(1)
    assert counts.var().item() == pytest.approx(16.0, rel=0.15)
    default = DPFedAvg(noise_multiplier=1.5, target_unclipped_quantile=0.5)
    with pytest.raises(ValueError, match=r"2 \* count_stddev > noise_multiplier.*raise `count_stddev` above 0.75"):
        default.setup_federation(num_sites=10, sample_rate=1.0)  # q N / 20 = 0.5
    default.setup_federation(num_sites=40, sample_rate=1.0)  # q N / 20 = 2: affordable
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        DPFedAvg(target_unclipped_quantile=1.0)


def test_dp_composes_with_a_server_optimizer(tmp_path):
    """A server optimizer after the noise is post-processing; FedAvgM(1, 0) leaves DP-FedAvg as it is."""
    from lightning_fedseg.federation import FedAdam, FedAvgM, Krum

    _, plain = federate(tmp_path / "dp", rounds=2, server=DPFedAvg(clip_norm=0.5, noise_multiplier=0.3, noise_seed=1))
    inner = FedAvgM(server_lr=1.0, momentum=0.0)
    dp = DPFedAvg(clip_norm=0.5, noise_multiplier=0.3, noise_seed=1, optimizer=inner)
    _, composed = federate(tmp_path / "dpm", rounds=2, server=dp)
    assert all(torch.equal(composed.state_dict()[k], v) for k, v in plain.state_dict().items())
    _, adam = federate(tmp_path / "dpa", rounds=2, server=DPFedAvg(noise_seed=1, optimizer=FedAdam()))
    assert all(torch.isfinite(v).all() for v in adam.state_dict().values() if v.is_floating_point())
    with pytest.raises(ValueError, match="FedAvg-family"):
        DPFedAvg(optimizer=Krum(num_byzantine=0))


def test_epsilon_is_opacus_accounting_and_target_stops_at_the_right_round(tmp_path):
    sigma, fraction, target = 1.0, 2 / 3, 8.0
    reference = RDPAccountant()
    allowed = 0
    while True:  # the last round count whose epsilon stays within the target
        reference.step(noise_multiplier=sigma, sample_rate=fraction)
        if reference.get_epsilon(delta=1e-5) > target:
            break
        allowed += 1
    dp = DPFedAvg(clip_norm=1.0, noise_multiplier=sigma, target_epsilon=target, noise_seed=0)
    strategy, _ = federate(tmp_path, rounds=50, mode=FedAvg(fraction=fraction, seed=1), server=dp)
    assert 0 < allowed < 50 and strategy.completed_rounds == allowed
    direct = RDPAccountant()
    for _ in range(allowed):
        direct.step(noise_multiplier=sigma, sample_rate=fraction)
    assert dp.epsilon() == pytest.approx(direct.get_epsilon(delta=1e-5))
    assert [h["privacy/epsilon"] for h in strategy.history] == sorted(h["privacy/epsilon"] for h in strategy.history)


def test_noise_shares_add_up_to_the_right_variance():
    """Four processes' shares of the noise on a zero sum: the total has variance (sigma C)^2."""
    dp = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, noise_seed=3)
    zero = {"w": torch.zeros(20000, dtype=torch.float64)}
    total = sum(dp.noise_share(zero, zero, world_size=4, rank=r, round_idx=0)["w"] for r in range(4))
    assert total.var().item() == pytest.approx((1.5 * 2.0) ** 2, rel=0.05)
    assert abs(total.mean().item()) < 0.1
    one = dp.noise_share(zero, zero, world_size=4, rank=0, round_idx=0)["w"]
    assert one.var().item() == pytest.approx((1.5 * 2.0) ** 2 / 4, rel=0.05)


def test_dp_refusals(tmp_path):
    with pytest.raises(UnsupportedFeatureError, match="does not privatize"):
        federate(tmp_path / "a", server=DPFedAvg(), client=SCAFFOLD())
    with pytest.raises(ValueError, match="already spends epsilon"):
        federate(tmp_path / "b", server=DPFedAvg(noise_multiplier=0.1, target_epsilon=0.5))
    with pytest.raises(ValueError, match="`clip_norm`"):
        DPFedAvg(clip_norm=0)


def pair_keys(world: int, round_idx: int = 0) -> dict[int, dict[int, bytes]]:
    keys = [RoundKeys() for _ in range(world)]
    publics = [k.public_bytes() for k in keys]
    return {
        r: {v: keys[r].shared_key(publics[v], round_idx, *sorted((r, v))) for v in range(world) if v != r}
        for r in range(world)
    }


def test_pairwise_secrets_agree_and_masks_cancel_exactly():
    world = 3
    secrets = pair_keys(world)
    for r in range(world):
        for v in range(world):
            if r != v:
                assert secrets[r][v] == secrets[v][r]
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(1000, generator=gen, dtype=torch.float64) * 100 for _ in range(world)]
    encoded = [encode(v) for v in values]
    masked = [mask(e, r, secrets[r], round_idx=0) for r, e in enumerate(encoded)]
    assert torch.equal(sum(masked), sum(encoded))  # exact cancellation modulo 2**64
    error = (decode(sum(masked)) - sum(values)).abs().max().item()
    assert error <= quantization_bound(world)


def test_a_masked_vector_is_uncorrelated_with_the_raw_values():
    secrets = pair_keys(2)
    raw = torch.linspace(-5, 5, 20000, dtype=torch.float64)
    masked = mask(encode(raw), 0, secrets[0], round_idx=0).double()
    r = torch.corrcoef(torch.stack([raw, masked]))[0, 1].item()
    assert abs(r) < 0.05
    assert not math.isclose(masked.std().item(), encode(raw).double().std().item(), rel_tol=0.5)


def test_masks_differ_between_rounds():
    secrets = pair_keys(2)
    zero = torch.zeros(8, dtype=torch.int64)
    assert not torch.equal(mask(zero, 0, secrets[0], round_idx=0), mask(zero, 0, secrets[0], round_idx=1))
