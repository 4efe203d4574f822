"""FederatedStrategy inside a real Trainer, on a small classifier (the drop-in path)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fedseg import CDS, CIIL, IIL, FedAvg, FederatedStrategy, RoundFailedError, SingleSite
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs


class SiteRecorder(Callback):
    """Records (round, site, Adam state size) at every training batch."""

    def __init__(self) -> None:
        self.visits: list[tuple[int, str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The site switch happens before any `on_train_batch_start`: the batch's own site is active.
        info = trainer.strategy.progress_info()
        opt = trainer.optimizers[0]
        self.visits.append((trainer.current_epoch, info.get("site", "?"), len(opt.state)))


def fit(tmp_path, strategy, datamodule=None, model=None, **overrides):
    pl.seed_everything(0, workers=True)
    model = model or ToyClassifier()
    datamodule = datamodule or ToyDataModule()
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, datamodule=datamodule)
    return trainer, model, datamodule


def test_fedavg_one_site_equals_plain_training(tmp_path):
    dm_kwargs = dict(sites=("a",), sizes=(40,), shuffle=False)
    _, fed, _ = fit(
        tmp_path / "fed",
        FederatedStrategy(FedAvg(local_epochs=1), optimizer_state="keep"),
        ToyDataModule(**dm_kwargs),
        max_epochs=3,
    )
    pl.seed_everything(0, workers=True)
    plain = ToyClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "plain", max_epochs=3))
    trainer.fit(plain, datamodule=ToyDataModule(**dm_kwargs))
    assert states_equal(fed.state_dict(), plain.state_dict())
    assert fed.seen_sites == plain.seen_sites


def test_fedavg_over_identical_sites_equals_one_site(tmp_path):
    one = ToyDataModule(sites=("a",), sizes=(32,), shuffle=False)
    three = ToyDataModule(sites=("a", "b", "c"), sizes=(32, 32, 32), shuffle=False, identical=True)
    _, m1, _ = fit(tmp_path / "1", FederatedStrategy(FedAvg()), one, max_epochs=2)
    _, m3, _ = fit(tmp_path / "3", FederatedStrategy(FedAvg()), three, max_epochs=2)
    for key, value in m1.state_dict().items():
        torch.testing.assert_close(m3.state_dict()[key], value, rtol=0, atol=1e-6)


def test_fedavg_is_the_sample_weighted_mean_of_site_results(tmp_path):
    """One round by hand: each site from the same start, then (24*a + 16*b + 8*c) / 48."""
    dm = ToyDataModule(shuffle=False)
    pl.seed_everything(0)
    start = ToyClassifier()
    init = {k: v.clone() for k, v in start.state_dict().items()}
    site_states = []
    for site in dm.site_names:
        model = ToyClassifier()
        model.load_state_dict(init)
        solo = ToyDataModule(sites=(site,), sizes=(len(dm.data[site][1]),), shuffle=False)
        solo.data = {site: dm.data[site]}
        trainer = pl.Trainer(strategy=FederatedStrategy(FedAvg()), **trainer_kwargs(tmp_path / site, max_epochs=1))
        trainer.fit(model, datamodule=solo)
        site_states.append(model.state_dict())
    fed = ToyClassifier()
    fed.load_state_dict(init)
    trainer = pl.Trainer(strategy=FederatedStrategy(FedAvg()), **trainer_kwargs(tmp_path / "fed", max_epochs=1))
    trainer.fit(fed, datamodule=dm)
    weights = [24, 16, 8]
    for key, value in fed.state_dict().items():
        if value.is_floating_point():
            expected = sum(w * s[key].double() for w, s in zip(weights, site_states, strict=True)) / 48
            torch.testing.assert_close(value, expected.float(), rtol=1e-6, atol=1e-6)
        else:  # num_batches_tracked: rounded weighted mean of 3, 2 and 1 batches
            assert value.item() == round((24 * 3 + 16 * 2 + 8 * 1) / 48)


def test_ciil_visits_sites_in_order_and_resets_optimizer(tmp_path):
    recorder = SiteRecorder()
    fit(tmp_path, FederatedStrategy(CIIL(epochs_per_site=1)), callbacks=[recorder], max_epochs=2)
    sites = [s for _, s, _ in recorder.visits]
    per_round = sites[: len(sites) // 2]
    assert per_round == ["a"] * 3 + ["b"] * 2 + ["c"] * 1
    assert sites == per_round * 2
    # reset: the first batch of every visit starts from an empty Adam state, seen at its batch start
    firsts = [v for i, v in enumerate(recorder.visits) if i == 0 or recorder.visits[i - 1][1] != v[1]]
    assert all(n_state == 0 for _, _, n_state in firsts)
    n_params = len(list(ToyClassifier().parameters()))
    assert all(v[2] == n_params for v in recorder.visits if v not in firsts)


def test_keep_policy_continues_each_sites_optimizer(tmp_path):
    recorder = SiteRecorder()
    strategy = FederatedStrategy(FedAvg(), optimizer_state="keep")
    fit(tmp_path, strategy, callbacks=[recorder], max_epochs=2)
    opt_states = strategy.site_states.state_dict()
    steps = {site: int(next(iter(states["optimizers"][0].values()))["step"]) for site, states in opt_states.items()}
    assert steps == {"a": 6, "b": 4, "c": 2}  # batches per round x 2 rounds


def test_single_site_never_touches_other_sites(tmp_path):
    _, model, dm = fit(tmp_path, FederatedStrategy(SingleSite("b")), max_epochs=2)
    assert set(dm.requested) == {"b"}
    assert set(model.seen_sites) == {1}


def test_cds_trains_on_pooled_data(tmp_path):
    _, model, dm = fit(tmp_path, FederatedStrategy(CDS()), max_epochs=1)
    assert sorted(set(model.seen_sites)) == [0, 1, 2]
    assert dm.requested == []


def test_short_names_are_registered(tmp_path):
    trainer, model, _ = fit(tmp_path, "fedavg", max_epochs=1)
    assert isinstance(trainer.strategy, FederatedStrategy)
    assert isinstance(trainer.strategy.mode, FedAvg)
    assert sorted(set(model.seen_sites)) == [0, 1, 2]


def test_validation_sees_global_weights_and_per_site_keys(tmp_path):
    class Check(Callback):
        def on_validation_start(self, trainer, pl_module):
            rnd = trainer.strategy.engine.round
            self.finished = rnd is None or rnd.finished

    check = Check()
    trainer, _, _ = fit(tmp_path, FederatedStrategy(FedAvg()), callbacks=[check], max_epochs=1)
    assert check.finished
    assert {"val/a/acc", "val/b/acc", "val/c/acc"} <= set(trainer.callback_metrics)
    assert trainer.strategy.history[0]["succeeded"] == ["a", "b", "c"]


def test_failed_site_is_dropped_with_warning(tmp_path):
    strategy = FederatedStrategy(FedAvg(), fault_schedule={"b": [1]}, min_sites=2)
    with pytest.warns(UserWarning, match="site 'b' failed"):
        fit(tmp_path, strategy, max_epochs=2)
    assert strategy.history[0]["succeeded"] == ["a", "b", "c"]
    assert strategy.history[1]["succeeded"] == ["a", "c"]
    assert "injected fault" in strategy.history[1]["failed"]["b"]


def test_nan_weights_are_dropped(tmp_path):
    strategy = FederatedStrategy(FedAvg(), fault_schedule={"c": [0]}, fault_kind="nan")
    with pytest.warns(UserWarning, match="non-finite"):
        _, model, _ = fit(tmp_path, strategy, max_epochs=1)
    assert strategy.history[0]["succeeded"] == ["a", "b"]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_too_few_sites_stops_and_keeps_last_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy = FederatedStrategy(FedAvg(), fault_schedule={"a": [1], "b": [1]}, min_sites=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RoundFailedError, match="Round 1: only 1 of 3 sites"):
            fit(tmp_path, strategy, callbacks=[ckpt], max_epochs=3, enable_checkpointing=True)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0


@pytest.mark.parametrize(
    "make_mode, rounds",
    [(lambda: FedAvg(), 4), (lambda: IIL(patience=1, monitor="val/{site}/acc"), 5)],
    ids=["fedavg", "iil"],
)
def test_resume_matches_uninterrupted_run(tmp_path, make_mode, rounds):
    common = dict(enable_checkpointing=True)
    _, full, _ = fit(
        tmp_path / "full",
        FederatedStrategy(make_mode(), optimizer_state="keep"),
        max_epochs=rounds,
        **common,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "part" / "ckpt", save_last=True)
    fit(
        tmp_path / "part",
        FederatedStrategy(make_mode(), optimizer_state="keep"),
        max_epochs=2,
        callbacks=[ckpt],
        **common,
    )
    pl.seed_everything(123)  # a different global RNG state must not matter after resuming
    resumed_model = ToyClassifier()
    trainer = pl.Trainer(
        strategy=FederatedStrategy(make_mode(), optimizer_state="keep"),
        **trainer_kwargs(tmp_path / "part", max_epochs=rounds, **common),
    )
    trainer.fit(
        resumed_model,
        datamodule=ToyDataModule(),
        ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"),
    )
    assert states_equal(resumed_model.state_dict(), full.state_dict())


def test_iil_passes_best_weights_and_stops_after_last_site(tmp_path):
    mode = IIL(patience=2, monitor="val/{site}/acc")
    strategy = FederatedStrategy(mode)
    trainer, _, _ = fit(tmp_path, strategy, max_epochs=100)
    assert trainer.current_epoch < 100  # stopped by the mode
    assert mode.position == 3
    sites = [h["site"] for h in mode.history]
    assert sites[0] == "a" and sites[-1] == "c"
    assert [s for i, s in enumerate(sites) if i == 0 or sites[i - 1] != s] == ["a", "b", "c"]


def test_datamodule_without_protocol_is_refused(tmp_path):
    class Plain(pl.LightningDataModule):
        def train_dataloader(self):
            return ToyDataModule().train_dataloader()

    with pytest.raises(TypeError, match="site_names"):
        fit(tmp_path, FederatedStrategy(FedAvg()), Plain(), max_epochs=1, limit_val_batches=0)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="`optimizer_state`"):
        FederatedStrategy(optimizer_state="sometimes")
    with pytest.raises(ValueError, match="`min_sites` to be a positive integer, but got 0"):
        FederatedStrategy(min_sites=0)
    with pytest.raises(TypeError, match="`mode`"):
        FederatedStrategy(mode="fedavg")  # type: ignore[arg-type]


def test_site_hooks_see_each_sites_trained_weights(tmp_path):
    class Hooks(Callback):
        def __init__(self):
            self.events = []

        def on_site_start(self, trainer, pl_module, site, round_idx):
            self.events.append(("start", site, round_idx))

        def on_site_end(self, trainer, pl_module, site, round_idx):
            self.events.append(("end", site, round_idx, pl_module.net[0].weight.detach().clone()))

    hooks = Hooks()
    fit(tmp_path, FederatedStrategy(FedAvg()), callbacks=[hooks], max_epochs=1)
    assert [e[:3] for e in hooks.events] == [(kind, site, 0) for site in "abc" for kind in ("start", "end")]
    ends = [e[3] for e in hooks.events if e[0] == "end"]
    assert not torch.equal(ends[0], ends[1])  # each site's own local result, before averaging


def test_progress_bar_shows_round_and_site(tmp_path):
    from lightning_fedseg import FederatedProgressBar

    class Spy(FederatedProgressBar):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.seen.append(
                (
                    self.train_progress_bar.desc,
                    self.get_metrics(trainer, pl_module)["site"],
                    self.train_progress_bar.total,
                )
            )

    spy = Spy()
    fit(tmp_path, FederatedStrategy(CIIL()), callbacks=[spy], max_epochs=2, enable_progress_bar=True)
    assert spy.seen[0] == ("ciil round 0: ", "a", 6) and spy.seen[-1] == ("ciil round 1: ", "c", 6)


@pytest.mark.parametrize(
    "address, allow_remote, refused",
    [("127.0.0.1", False, False), ("localhost", False, False), ("10.1.2.3", False, True), ("10.1.2.3", True, False)],
)
def test_non_loopback_address_needs_acknowledgement(monkeypatch, address, allow_remote, refused):
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("MASTER_ADDR", address)
    monkeypatch.setenv("MASTER_PORT", "29555")
    strategy = FederatedStrategy(FedAvg(), allow_remote=allow_remote, cluster_environment=LightningEnvironment())
    strategy.parallel_devices = [torch.device("cpu")] * 2
    initialized = []
    monkeypatch.setattr(pl.strategies.DDPStrategy, "setup_distributed", lambda self: initialized.append(True))
    if refused:
        with pytest.raises(RuntimeError, match=r"refuses to bind the non-loopback address '10\.1\.2\.3'"):
            strategy.setup_distributed()
        assert not initialized
    else:
        strategy.setup_distributed()
        assert initialized == [True]


def test_with_last_never_reads_past_the_limit():
    from lightning_fedseg.federation.rounds import with_last

    asked = []

    def items():
        for i in range(5):
            asked.append(i)
            yield i

    assert list(with_last(items(), limit=2)) == [(0, False), (1, True)]
    assert asked == [0, 1]  # a third batch would be read and thrown away
    asked.clear()
    assert list(with_last(items())) == [(0, False), (1, False), (2, False), (3, False), (4, True)]
    assert list(with_last(items(), limit=9))[-1] == (4, True)
