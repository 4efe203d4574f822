"""Attacks on flat update vectors against values computed by hand (each paper's rule)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedseg.federation import attacks


def test_site_side_attacks():
    update = torch.tensor([1.0, -2.0, 0.5])
    assert attacks.sign_flip(update).tolist() == [-1.0, 2.0, -0.5]
    assert attacks.scaling(update, 4.0).tolist() == [4.0, -8.0, 2.0]
    first = attacks.gaussian(torch.zeros(20000), 3.0, torch.Generator().manual_seed(5))
    again = attacks.gaussian(torch.zeros(20000), 3.0, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and first.dtype == torch.float64
    assert first.std().item() == pytest.approx(3.0, rel=0.03) and abs(first.mean().item()) < 0.06


HONEST = torch.tensor([[0.0, 2.0, 1.0], [2.0, 2.0, -1.0], [4.0, 2.0, 3.0]])  # mu = (2, 2, 1); sigma^2 = (8/3, 0, 8/3)


def test_omniscient_attacks_by_hand():
    sigma = (8 / 3) ** 0.5
    torch.testing.assert_close(
        attacks.alie(HONEST, z=1.5), torch.tensor([2 + 1.5 * sigma, 2.0, 1 + 1.5 * sigma]).double()
    )
    assert attacks.ipm(HONEST, epsilon=2.0).tolist() == [-4.0, -4.0, -2.0]
    assert attacks.sign_flip(HONEST.mean(0)).tolist() == [-2.0, -2.0, -1.0]
    assert attacks.mimic(HONEST, target=2).tolist() == [4.0, 2.0, 3.0]
    torch.testing.assert_close(attacks.perturbation(HONEST, "std"), torch.tensor([-sigma, 0.0, -sigma]).double())
    assert attacks.perturbation(HONEST, "sign").tolist() == [-1.0, -1.0, -1.0]
    torch.testing.assert_close(attacks.perturbation(HONEST, "unit"), -torch.tensor([2.0, 2.0, 1.0]).double() / 3)


def test_alie_z_is_the_papers():
    # s = floor(n / 2 + 1) - f, z = Phi^-1((n - s) / n): n = 10, f = 3 -> s = 3, Phi^-1(0.7)
    assert attacks.alie_z(10, 3) == pytest.approx(0.524400512)
    assert attacks.alie_z(10, 1) == 0.0  # s = 5: the median itself
    assert attacks.alie_z(32, 8) == pytest.approx(0.5791, abs=1e-4)  # s = 9, Phi^-1(23 / 32)
    with pytest.raises(ValueError, match="undefined"):
        attacks.alie_z(2, 0)


@pytest.mark.parametrize("kind", ["std", "unit", "sign"])
@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_min_max_and_min_sum_are_maximal(kind, tol):
    honest = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).double()
    mu, p = honest.mean(0), attacks.perturbation(honest, kind)
    distances = torch.cdist(honest, honest).square()

    def worst(v):  # min-max: the largest squared distance to an honest update
        return torch.cdist(v.unsqueeze(0), honest).square().max()

    def total(v):  # min-sum: the sum of squared distances to the honest updates
        return torch.cdist(v.unsqueeze(0), honest).square().sum()

    update, gamma = attacks.min_max(honest, kind, tol=tol)
    torch.testing.assert_close(update, mu + gamma * p)
    assert gamma > 0 and worst(update) <= distances.max()
    assert worst(mu + (gamma + 2 * tol) * p) > distances.max()
    update, gamma = attacks.min_sum(honest, kind, tol=tol)
    assert gamma > 0 and total(update) <= distances.sum(1).max()
    assert total(mu + (gamma + 2 * tol) * p) > distances.sum(1).max()


def test_min_max_by_hand_and_without_spread():
    update, gamma = attacks.min_max(torch.tensor([[0.0], [2.0]]), tol=1e-6)  # (1 + gamma)^2 <= 4
    assert gamma == pytest.approx(1.0, abs=1e-6) and update.item() == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(3, 2)  # sigma = 0: every gamma is feasible and the attack is the mean
    update, _ = attacks.min_max(same)
    assert update.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive"):
        attacks.largest_gamma(lambda g: True, tol=0.0)
    with pytest.raises(ValueError, match=r"\(h, d\) matrix"):
        attacks.alie(torch.zeros(3), 1.0)


def test_label_flipping_in_place():
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert attacks.flip_labels(mask, "invert") is mask and mask.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    labels = torch.tensor([0, 1, 1])
    assert attacks.flip_labels(labels, "invert").tolist() == [1, 0, 0]
    assert attacks.flip_labels(torch.tensor([True, False]), "invert").tolist() == [False, True]
    assert attacks.flip_labels(labels, "erase").tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        attacks.flip_labels(labels, "shuffle")
