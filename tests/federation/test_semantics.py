"""Lightning's features under the federation: equal to plain Lightning, a stated meaning, or refused.

The reference for every supported feature is plain Lightning: a one-site federation under
``keep`` equals plain Lightning bit for bit, and a multi-site round equals its sites trained alone
(by plain Lightning) from the round's global weights, combined by hand.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer

from lightning_fedseg import CIIL, IIL, FedAvg, FederatedStrategy, SingleSite
from lightning_fedseg.federation import UnsupportedFeatureError
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs


def step_lr(optimizer):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), "interval": "epoch"}


def plateau(optimizer, monitor="val/a/acc"):
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    return {"scheduler": scheduler, "monitor": monitor, "interval": "epoch"}


def one_cycle(optimizer):
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=40)
    return {"scheduler": scheduler, "interval": "step"}


class LRRecorder(Callback):
    """The learning rate of the first optimizer at every training batch (after any site switch)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def train(tmp_path, strategy, dm_kwargs, model_kwargs=None, callbacks=(), **trainer_overrides):
    pl.seed_everything(0)
    model = ToyClassifier(**(model_kwargs or {}))
    kwargs = trainer_kwargs(tmp_path, **trainer_overrides)
    if strategy is not None:
        kwargs["strategy"] = strategy
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=ToyDataModule(**dm_kwargs))
    return trainer, model


def fp16_with_scaler():
    """16-bit AMP with a GradScaler on the CPU (Lightning's "16-mixed" falls back to bf16 there)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


ONE_SITE = dict(sites=("a",), sizes=(40,), batch_size=8, shuffle=False)  # 5 batches: an odd count

# Each entry: Trainer overrides and module arguments that plain Lightning and a one-site federation share.
EQUIVALENT = {
    "plain": ({}, {}),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 2}, {}),
    "gradient_clip_val": ({"gradient_clip_val": 0.05}, {}),
    "gradient_clip_value": ({"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}, {}),
    "StepLR (epoch)": ({}, {"scheduler": step_lr}),
    "ReduceLROnPlateau": ({}, {"scheduler": plateau}),
    "OneCycleLR (step)": ({}, {"scheduler": one_cycle}),
    "accumulate + OneCycleLR": ({"accumulate_grad_batches": 2}, {"scheduler": one_cycle}),
    "limit_train_batches int": ({"limit_train_batches": 2}, {}),
    "limit_train_batches float": ({"limit_train_batches": 0.6}, {}),
    "check_val_every_n_epoch": ({"check_val_every_n_epoch": 2}, {}),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {}),
    "16-mixed with GradScaler": (fp16_with_scaler, {}),
    "manual optimization, two optimizers": ({}, {"manual": True}),
}


@pytest.mark.parametrize("feature", list(EQUIVALENT))
@pytest.mark.parametrize("make_mode", [FedAvg, SingleSite, CIIL], ids=["fedavg", "single", "ciil"])
def test_one_site_federation_equals_plain_lightning(tmp_path, feature, make_mode):
    overrides, model_kwargs = EQUIVALENT[feature]
    make_overrides = overrides if callable(overrides) else lambda: dict(overrides)
    plain_lr, fed_lr = LRRecorder(), LRRecorder()
    _, plain = train(tmp_path / "plain", None, ONE_SITE, model_kwargs, [plain_lr], max_epochs=4, **make_overrides())
    strategy = FederatedStrategy(make_mode(), optimizer_state="keep")
    _, fed = train(tmp_path / "fed", strategy, ONE_SITE, model_kwargs, [fed_lr], max_epochs=4, **make_overrides())
    assert fed_lr.lrs == plain_lr.lrs
    assert states_equal(fed.state_dict(), plain.state_dict())
    assert fed.seen_sites == plain.seen_sites


THREE_SITES = dict(sites=("a", "b", "c"), sizes=(24, 20, 12), batch_size=8, shuffle=False)  # 3, 3 and 2 batches


def round_by_hand(tmp_path, init, overrides, model_kwargs=None):
    """Each site trained alone by plain Lightning for one epoch from ``init``, then the weighted mean."""
    dm = ToyDataModule(**THREE_SITES)
    states, weights = [], []
    for site in dm.site_names:
        model = ToyClassifier(**(model_kwargs or {}))
        model.load_state_dict(init)
        solo = ToyDataModule(sites=(site,), sizes=(len(dm.data[site][1]),), batch_size=8, shuffle=False)
        solo.data = {site: dm.data[site]}
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / site, max_epochs=1, **overrides))
        trainer.fit(model, datamodule=solo)
        states.append(model.state_dict())
        weights.append(len(dm.data[site][1]))
    total = sum(weights)
    return {
        key: (sum(w * s[key].double() for w, s in zip(weights, states, strict=True)) / total).to(value.dtype)
        for key, value in states[0].items()
        if value.is_floating_point()
    }


@pytest.mark.parametrize(
    "overrides",
    [{"accumulate_grad_batches": 2}, {"limit_train_batches": 2}, {"gradient_clip_val": 0.05}],
    ids=["accumulate_grad_batches=2", "limit_train_batches=2", "gradient_clip_val"],
)
def test_fedavg_round_equals_sites_trained_alone(tmp_path, overrides):
    pl.seed_everything(0)
    init = {k: v.clone() for k, v in ToyClassifier().state_dict().items()}
    expected = round_by_hand(tmp_path / "alone", init, overrides)
    fed = ToyClassifier()
    fed.load_state_dict(init)
    strategy = FederatedStrategy(FedAvg())
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path / "fed", max_epochs=1, **overrides))
    trainer.fit(fed, datamodule=ToyDataModule(**THREE_SITES))
    assert strategy.history[0]["succeeded"] == ["a", "b", "c"]
    for key, value in expected.items():
        torch.testing.assert_close(fed.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_epoch_scheduler_is_one_schedule_for_the_federation(tmp_path):
    """StepLR under FedAvg/reset: every site of round r trains at 0.05 * 0.5**r."""
    recorder = LRRecorder()
    train(tmp_path, FederatedStrategy(FedAvg()), THREE_SITES, {"scheduler": step_lr}, [recorder], max_epochs=3)
    per_round = [recorder.lrs[i * 8 : (i + 1) * 8] for i in range(3)]
    assert per_round == [[0.05 * 0.5**r] * 8 for r in range(3)]


def test_plateau_scheduler_steps_on_the_rounds_global_metric(tmp_path):
    """ReduceLROnPlateau on a metric that never improves: the LR halves after every round but the first,
    as in plain Lightning on the same data."""

    class Flat(ToyClassifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.log("val/flat", 0.5)

    sched = partial(plateau, monitor="val/flat")
    for name, strategy in (("plain", None), ("single", FederatedStrategy(SingleSite("a")))):
        recorder = LRRecorder()
        pl.seed_everything(0)
        kwargs = trainer_kwargs(tmp_path / name, max_epochs=4)
        if strategy is not None:
            kwargs["strategy"] = strategy
        pl.Trainer(callbacks=[recorder], **kwargs).fit(Flat(scheduler=sched), datamodule=ToyDataModule(**ONE_SITE))
        assert recorder.lrs[::5] == [0.05, 0.05, 0.025, 0.0125], name


def test_callbacks_see_the_sites_own_weights_from_its_first_batch(tmp_path):
    class Watch(Callback):
        def __init__(self):
            self.mismatches = []
            self.first_batches = 0

        def on_train_epoch_start(self, trainer, pl_module):
            self.global_state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.site = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            site = trainer.strategy.progress_info()["site"]
            if site != self.site:  # a site's first batch: the round's global weights, fresh optimizer
                self.first_batches += 1
                if not states_equal(pl_module.state_dict(), self.global_state) or trainer.optimizers[0].state:
                    self.mismatches.append(site)
            self.site = site

    watch = Watch()
    train(tmp_path, FederatedStrategy(FedAvg()), THREE_SITES, callbacks=[watch], max_epochs=2)
    assert watch.first_batches == 6 and watch.mismatches == []


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_failed_site_under_mixed_precision_is_dropped(tmp_path, precision):
    strategy = FederatedStrategy(FedAvg(), fault_schedule={"b": [0]})
    overrides = fp16_with_scaler() if precision == "16-mixed" else {"precision": precision}
    with pytest.warns(UserWarning, match="site 'b' failed"):
        train(tmp_path, strategy, THREE_SITES, max_epochs=2, **overrides)
    assert strategy.history[0]["succeeded"] == ["a", "c"] and strategy.history[1]["succeeded"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"val_check_interval": 2}, "val_check_interval=2"),
        ({"val_check_interval": 0.5}, "val_check_interval=0.5"),
        ({"max_steps": 3}, "max_steps=3"),
        ({"max_time": {"seconds": 30}}, "max_time"),
        ({"callbacks": [Timer(duration={"seconds": 30}, interval="step")]}, "Timer"),
        ({"callbacks": [ModelCheckpoint(every_n_train_steps=1)], "enable_checkpointing": True}, "every_n_train_steps"),
        (
            {"callbacks": [ModelCheckpoint(train_time_interval=timedelta(seconds=1))], "enable_checkpointing": True},
            "train_time_interval",
        ),
    ],
    ids=["val_check_interval int", "val_check_interval float", "max_steps", "max_time", "Timer step", "ckpt steps",
         "ckpt time"],
)  # fmt: skip
def test_settings_that_cut_a_round_are_refused(tmp_path, overrides, match):
    callbacks = overrides.pop("callbacks", [])
    with pytest.raises(UnsupportedFeatureError, match=match):
        train(tmp_path, FederatedStrategy(FedAvg()), THREE_SITES, callbacks=callbacks, max_epochs=2, **overrides)


def test_epoch_timer_stops_at_a_rounds_end(tmp_path):
    timer = Timer(duration={"days": 1}, interval="epoch")
    strategy = FederatedStrategy(FedAvg())
    train(tmp_path, strategy, THREE_SITES, callbacks=[timer], max_epochs=2)
    assert [h["succeeded"] for h in strategy.history] == [["a", "b", "c"]] * 2


def test_checkpoint_inside_a_round_is_refused(tmp_path):
    class SaveMidRound(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.save_checkpoint(tmp_path / "mid.ckpt")

    with pytest.raises(RuntimeError, match="inside round 0"):
        train(tmp_path, FederatedStrategy(FedAvg()), THREE_SITES, callbacks=[SaveMidRound()], max_epochs=1)
    assert not (tmp_path / "mid.ckpt").exists()


def test_step_and_epoch_schedulers_on_one_optimizer_are_refused(tmp_path):
    def both(optimizer):
        return step_lr(optimizer)

    class Both(ToyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.05)
            return [opt], [step_lr(opt), one_cycle(opt)]

    pl.seed_everything(0)
    trainer = pl.Trainer(strategy=FederatedStrategy(FedAvg()), **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(UnsupportedFeatureError, match="both a step-interval and an epoch-interval"):
        trainer.fit(Both(), datamodule=ToyDataModule(**THREE_SITES))


def test_iil_refuses_validation_every_n_rounds(tmp_path):
    with pytest.raises(UnsupportedFeatureError, match="check_val_every_n_epoch=2"):
        train(tmp_path, FederatedStrategy(IIL(monitor="val/{site}/acc")), THREE_SITES, check_val_every_n_epoch=2)


def test_iil_site_without_validation_data(tmp_path):
    class NoValB(ToyDataModule):
        def _site_tensors(self, site, index):
            x, y, i = super()._site_tensors(site, index)
            return (x[:0], y[:0], i[:0]) if site == "b" else (x, y, i)

    def run(mode):
        pl.seed_everything(0)
        strategy = FederatedStrategy(mode)
        trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=30))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(ToyClassifier(), datamodule=NoValB(**THREE_SITES))
        return mode

    with pytest.raises(ValueError, match=r"site 'b'.*max_epochs_per_site"):
        run(IIL(patience=1, monitor="val/{site}/acc"))
    mode = run(IIL(patience=1, monitor="val/{site}/acc", max_epochs_per_site=3))
    at_b = [h for h in mode.history if h["site"] == "b"]
    assert len(at_b) == 3 and mode.position == 3


@pytest.mark.parametrize("make_mode", [CIIL, IIL], ids=["ciil", "iil"])
def test_an_order_that_omits_a_site_is_refused(tmp_path, make_mode):
    with pytest.raises(ValueError, match=r"missing: \['c'\]"):
        train(tmp_path, FederatedStrategy(make_mode(order=["b", "a"])), THREE_SITES, max_epochs=1)


def test_reset_keeps_no_site_state_and_checkpoints_no_moments(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy = FederatedStrategy(FedAvg())
    train(tmp_path, strategy, THREE_SITES, callbacks=[ckpt], max_epochs=2, enable_checkpointing=True)
    assert strategy.site_states.state_dict() == {}
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["federation"]["site_states"] == {}
    assert [o["state"] for o in last["optimizer_states"]] == [{}]


def test_keep_checkpoint_holds_each_sites_moments(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy = FederatedStrategy(FedAvg(), optimizer_state="keep")
    train(tmp_path, strategy, THREE_SITES, callbacks=[ckpt], max_epochs=2, enable_checkpointing=True)
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["federation"]["site_states"]
    steps = {site: int(next(iter(s["optimizers"][0].values()))["step"]) for site, s in states.items()}
    assert steps == {"a": 6, "b": 6, "c": 4}


@pytest.mark.parametrize("make_mode", [FedAvg, SingleSite], ids=["fedavg", "single"])
def test_early_stopping_and_sanity_check_as_in_plain_lightning(tmp_path, make_mode):
    """EarlyStopping on a round's metric stops at the same round; the sanity check is not a round."""
    from lightning.pytorch.callbacks import EarlyStopping

    def stopper():
        return EarlyStopping(monitor="val/a/acc", mode="max", patience=1, min_delta=0.5)

    common = dict(max_epochs=10, num_sanity_val_steps=2)
    plain_trainer, plain = train(tmp_path / "plain", None, ONE_SITE, callbacks=[stopper()], **common)
    strategy = FederatedStrategy(make_mode(), optimizer_state="keep")
    fed_trainer, fed = train(tmp_path / "fed", strategy, ONE_SITE, callbacks=[stopper()], **common)
    assert plain_trainer.current_epoch < 10 and fed_trainer.current_epoch == plain_trainer.current_epoch
    assert strategy.completed_rounds == fed_trainer.current_epoch
    assert states_equal(fed.state_dict(), plain.state_dict())
