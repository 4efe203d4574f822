import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_fedseg
from lightning_fedseg.data.conventions import Target
from lightning_fedseg.module import BrainTumorSegmentation, build_network, paper_adam

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


class TinySlices(Dataset):
    """All slices of a few random cases, ordered case by case, z ascending (the batch contract)."""

    def __init__(self, site: str, num_cases: int, num_slices: int, channels: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for c in range(num_cases):
            image = rng.normal(size=(channels, SIZE, SIZE, num_slices)).astype(np.float32)
            target = np.zeros((channels, SIZE, SIZE, num_slices), np.float32)
            x, y = rng.integers(4, SIZE - 14, size=2)
            target[:, x : x + 10, y : y + 10, 1:] = 1.0  # slice 0 has no tumor
            target[1:, x + 5 :, :, :] = 0.0  # nested, smaller TC and ET when K = 3
            image += 2 * target[:1]
            for z in range(num_slices):
                self.items.append(
                    {
                        "image": torch.from_numpy(image[..., z]),
                        "target": torch.from_numpy(target[..., z]),
                        "case_id": f"{site}_case{c}",
                        "slice_index": torch.tensor(z),
                        "num_slices": torch.tensor(num_slices),
                    }
                )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class TinyDataModule(pl.LightningDataModule):
    def __init__(self, k=1, sites=("siteA", "siteB"), empty_sites=(), batch_size=4):
        super().__init__()
        self.k, self.batch_size = k, batch_size
        self.site_names = list(sites) + list(empty_sites)
        self.val_loader_names = self.site_names
        self.sets = {
            site: TinySlices(site, 0 if site in empty_sites else 2, 3, k, seed)
            for seed, site in enumerate(self.site_names)
        }
        # Image channels = K so one dataset serves both targets; the image uses channel 0.

    def train_dataloader(self):
        pooled = torch.utils.data.ConcatDataset([s for s in self.sets.values() if len(s)])
        return DataLoader(pooled, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return [DataLoader(self.sets[s], batch_size=self.batch_size) for s in self.site_names]

    def test_dataloader(self):
        return DataLoader(self.sets[self.site_names[0]], batch_size=self.batch_size)

    def predict_dataloader(self):
        return self.test_dataloader()


def tiny_network(in_channels=1, classes=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, classes, 1),
    )


def trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**(defaults | kwargs))


# ---------------------------------------------------------------- loss


def _paper_loss(probs, target, smooth=1.0):
    """log(|P| + |T| + smooth) - log(2|P∩T| + smooth), sums over batch and pixels."""
    p, t = probs.sum(), target.sum()
    inter = (probs * target).sum()
    return math.log(p + t + smooth) - math.log(2 * inter + smooth)


def test_smp_dice_loss_with_smooth_half_is_the_papers_formula():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[1.0, 0.0], [-2.0, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    probs = torch.sigmoid(logits).double()
    model = BrainTumorSegmentation(network=tiny_network(), dice_smooth=0.5)
    expected = _paper_loss(probs, target.double(), smooth=1.0)
    assert model.loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # smp's smooth=1 adds 2 to both terms instead.
    model_one = BrainTumorSegmentation(network=tiny_network(), dice_smooth=1.0)
    expected_one = _paper_loss(probs, target.double(), smooth=2.0)
    assert model_one.loss(logits, target).item() == pytest.approx(expected_one, rel=1e-5)


def test_multilabel_loss_is_the_channel_mean_and_skips_empty_channels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = (torch.rand(2, 3, 4, 4) > 0.5).float()
    target[:, 2] = 0.0  # no ET anywhere in the batch: smp sets that channel's loss to 0
    probs = torch.sigmoid(logits).double()
    model = BrainTumorSegmentation(network=tiny_network(classes=3), target="regions")
    per_channel = [_paper_loss(probs[:, k], target[:, k].double()) for k in range(2)] + [0.0]
    assert model.loss(logits, target).item() == pytest.approx(np.mean(per_channel), rel=1e-5)
    # The paper's formula would instead charge log(|P| + 1) for that channel.
    assert _paper_loss(probs[:, 2], target[:, 2].double()) > 0


def test_dice_bce_adds_binary_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    dice = BrainTumorSegmentation(network=tiny_network()).loss(logits, target)
    both = BrainTumorSegmentation(network=tiny_network(), loss="dice_bce").loss(logits, target)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert both.item() == pytest.approx((dice + bce).item(), rel=1e-6)


def test_loss_rejects_wrong_channel_count():
    model = BrainTumorSegmentation(network=tiny_network(classes=1), target="regions")
    with pytest.raises(ValueError, match="3 channels for target=regions"):
        model.loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- construction


def test_smp_network_from_registry_and_target_channels():
    model = BrainTumorSegmentation(
        in_channels=2,
        target=Target.REGIONS,
        encoder_name="tu-resnet10t",
        encoder_depth=2,
        decoder_channels=(8, 4),
    )
    assert model(torch.zeros(1, 2, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)
    assert model.hparams["target"] == "regions"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"arch": "unetx"}, KeyError, r"Unknown `arch` 'unetx'.*'unet'"),
        ({"encoder_name": "resnet1"}, KeyError, r"Unknown `encoder_name` 'resnet1'.*'resnet18'"),
        ({"encoder_name": "tu-nonet"}, KeyError, "not a timm model"),
        (
            {"in_channels": 0},
            ValueError,
            "Expected `in_channels` to be a positive integer, but got 0",
        ),
        ({"target": "xx"}, ValueError, r"`target` to be one of \['wt', 'regions'\], but got 'xx'"),
        ({"loss": "ce"}, ValueError, "`loss` to be one of"),
        ({"threshold": 1.0}, ValueError, "`threshold`"),
        ({"log_images": -1}, ValueError, "`log_images`"),
        ({"hd95_reduction": "mean"}, ValueError, "`hd95_reduction`"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BrainTumorSegmentation(**kwargs)


def test_build_network_passes_smp_options():
    net = build_network("unet", "resnet18", 1, 1, encoder_depth=3, decoder_channels=[16, 8, 4])
    assert [block.conv2[0].out_channels for block in net.decoder.blocks] == [16, 8, 4]


# ---------------------------------------------------------------- training and validation


def _hand_volume_dice(model, datamodule, site):
    """Mean over the site's volumes of the per-volume Dice, averaged over regions (numpy)."""
    model.eval()
    per_case = {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader()[datamodule.val_loader_names.index(site)]:
            pred = (torch.sigmoid(model(batch["image"])) > 0.5).numpy()
            target = batch["target"].numpy() > 0.5
            for b, case in enumerate(batch["case_id"]):
                p, t = per_case.setdefault(case, ([], []))
                p.append(pred[b])
                t.append(target[b])
    scores = []
    for p, t in per_case.values():
        p, t = np.stack(p, -1), np.stack(t, -1)
        region_scores = []
        for k in range(p.shape[0]):
            total = p[k].sum() + t[k].sum()
            region_scores.append(1.0 if total == 0 else 2 * (p[k] & t[k]).sum() / total)
        scores.append(np.mean(region_scores))
    return scores


def test_fit_logs_the_contract_keys_and_validate_matches_hand_computed_dice(tmp_path):
    torch.manual_seed(0)
    datamodule = TinyDataModule(empty_sites=("siteC",))
    model = BrainTumorSegmentation(network=tiny_network(), log_images=0)
    t = trainer(tmp_path)
    with pytest.warns(UserWarning):  # Lightning: the empty siteC loader
        t.fit(model, datamodule=datamodule)
    keys = set(t.callback_metrics)
    expected = {"train/loss", "train/loss_step", "train/loss_epoch", "train/dice", "val/loss"}
    expected |= {"val/dice", "val/dice_wt", "val/hd95_wt", "val/slice_dice"}
    expected |= {f"val/{s}/{k}" for s in ("siteA", "siteB") for k in ("dice", "dice_wt")}
    assert keys == expected  # no siteC keys: it had no volumes
    assert model.val_site_names == ["siteA", "siteB", "siteC"]

    results = t.validate(model, datamodule=datamodule, verbose=False)
    assert all(r == results[0] for r in results)  # epoch-level keys, one copy per loader
    results = results[0]
    site_a = _hand_volume_dice(model, datamodule, "siteA")
    site_b = _hand_volume_dice(model, datamodule, "siteB")
    assert len(site_a) == len(site_b) == 2
    assert results["val/dice"] == pytest.approx(np.mean(site_a + site_b), abs=1e-6)
    assert results["val/dice_wt"] == pytest.approx(np.mean(site_a + site_b), abs=1e-6)
    assert results["val/siteA/dice"] == pytest.approx(np.mean(site_a), abs=1e-6)
    assert results["val/siteB/dice"] == pytest.approx(np.mean(site_b), abs=1e-6)
    assert 0.0 <= results["val/hd95_wt"] <= 373.2


def test_loaders_without_names_fall_back_to_loader_index(tmp_path):
    datamodule = TinyDataModule()
    model = BrainTumorSegmentation(network=tiny_network(), compute_hd95=False)
    results = trainer(tmp_path).validate(model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]
    assert {"val/loader0/dice", "val/loader1/dice", "val/dice"} <= set(results)
    assert "val/hd95_wt" not in results


def test_incomplete_cases_are_reported_not_scored(tmp_path):
    model = BrainTumorSegmentation(network=tiny_network())
    with pytest.warns(UserWarning, match="did not receive all their slices"):
        results = trainer(tmp_path, limit_val_batches=1).validate(
            model, datamodule=TinyDataModule(batch_size=2), verbose=False
        )[0]
    assert "val/dice" not in results and "val/loss" in results


def test_regions_target_test_keys(tmp_path):
    model = BrainTumorSegmentation(network=tiny_network(3, 3), in_channels=3, target="regions")
    (results,) = trainer(tmp_path).test(model, datamodule=TinyDataModule(k=3), verbose=False)
    regions = ("wt", "tc", "et")
    expected = {"test/loss", "test/dice"} | {f"test/{m}_{r}" for m in ("dice", "hd95") for r in regions}
    assert set(results) == expected
    assert results["test/dice"] == pytest.approx(np.mean([results[f"test/dice_{r}"] for r in regions]))


def test_predict_step_returns_the_contract_dict(tmp_path):
    model = BrainTumorSegmentation(network=tiny_network())
    outputs = trainer(tmp_path).predict(model, datamodule=TinyDataModule())
    first = outputs[0]
    assert set(first) == {"case_id", "slice_index", "num_slices", "probs"}
    assert first["probs"].shape == (4, 1, SIZE, SIZE)
    assert ((first["probs"] >= 0) & (first["probs"] <= 1)).all()
    assert first["case_id"][:3] == ["siteA_case0"] * 3


def test_validation_slices_are_drawn_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    model = BrainTumorSegmentation(network=tiny_network(), log_images=2, compute_hd95=False)
    trainer(tmp_path, logger=logger, limit_train_batches=1).fit(model, datamodule=TinyDataModule())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/examples/0", "val/examples/1"]


# ---------------------------------------------------------------- checkpoints and CLI


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = BrainTumorSegmentation(encoder_name="tu-resnet10t", encoder_depth=2, decoder_channels=(8, 4))
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    t.fit(model, datamodule=TinyDataModule())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    assert "optimizer" not in model.hparams  # a function: not storable, the default is rebuilt
    restored = BrainTumorSegmentation.load_from_checkpoint(path)  # weights_only load
    image = torch.randn(2, 1, SIZE, SIZE)
    model.eval()
    restored.eval()
    assert torch.equal(model(image), restored(image))
    assert isinstance(restored.configure_optimizers(), torch.optim.Adam)
    assert restored.configure_optimizers().defaults["lr"] == 5e-4


def _module_class_path():
    if hasattr(lightning_fedseg, "BrainTumorSegmentation"):
        return "lightning_fedseg.BrainTumorSegmentation"
    return "lightning_fedseg.module.BrainTumorSegmentation"


def _cli(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-fedseg"])
    return LightningCLI(
        pl.LightningModule,
        subclass_mode_model=True,
        run=False,
        args=args,
        trainer_defaults={"logger": False, "enable_checkpointing": False},
    )


def test_cli_network_class_path_and_optimizer_survive_a_checkpoint(tmp_path, monkeypatch):
    model_config = {
        "class_path": _module_class_path(),
        "init_args": {
            "network": {
                "class_path": "torch.nn.Conv2d",
                "init_args": {"in_channels": 1, "out_channels": 1, "kernel_size": 3, "padding": 1},
            },
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
            "lr_scheduler": {
                "class_path": "torch.optim.lr_scheduler.StepLR",
                "init_args": {"step_size": 2},
            },
        },
    }
    cli = _cli({"model": model_config, "trainer": {"default_root_dir": str(tmp_path)}}, monkeypatch)
    config = cli.model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["lr"] == 0.1
    cli.trainer.strategy.connect(cli.model)
    path = tmp_path / "cli.ckpt"
    cli.trainer.save_checkpoint(path)
    restored = BrainTumorSegmentation.load_from_checkpoint(path)
    assert isinstance(restored.network, nn.Conv2d)
    assert torch.equal(restored.network.weight, cli.model.network.weight)
    assert isinstance(restored.configure_optimizers()["optimizer"], torch.optim.SGD)


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_model_configs_instantiate_and_round_trip_print_config(name, tmp_path, capsys, monkeypatch):
    config = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_fedseg.BrainTumorSegmentation"
    config["model"]["class_path"] = _module_class_path()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        _cli(["--config", str(path), "--print_config"], monkeypatch)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 5e-4
    model = _cli({"model": printed["model"]}, monkeypatch).model
    assert isinstance(model, BrainTumorSegmentation)
    assert model(torch.zeros(1, model.hparams["in_channels"], 64, 64)).shape[1] == 1
    params = sum(p.numel() for p in model.parameters())
    if name == "paper":
        assert 7.5e6 < params < 8.5e6  # the paper's U-Net has about 7.85M
    else:
        assert params < 1e6
    assert model.configure_optimizers().defaults["lr"] == 5e-4


def test_paper_adam_default():
    optimizer = paper_adam([nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 5e-4
