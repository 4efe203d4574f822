"""The `lightning-fedseg` command: help, synth, data check, and a real fit/test from a mode config."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_fedseg.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_FEDSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert (
        main(["synth", "--out", str(out), "--num_subjects", "36", "--num_sites", "3", "--shape", "24", "24", "12"]) == 0
    )
    return out


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "synth", "data"):
        assert name in out


def test_synth_writes_brats_layout_and_data_check_passes(small_dataset, capsys):
    cases = sorted(p for p in small_dataset.iterdir() if p.is_dir())
    assert len(cases) == 36
    files = sorted(f.name for f in cases[0].iterdir())
    cid = cases[0].name
    assert files == sorted(f"{cid}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg"))
    assert (small_dataset / "partition.csv").read_text().splitlines()[0] == "Subject_ID,Partition_ID"
    assert main(["data", "check", str(small_dataset)]) == 0
    assert main(["data", "check", str(small_dataset), "--workers", "2"]) == 0
    assert "Checked 36 cases" in capsys.readouterr().out


def test_data_check_reports_every_bad_case_and_fails(small_dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(small_dataset, bad)
    cases = sorted(p for p in bad.iterdir() if p.is_dir())
    (cases[0] / f"{cases[0].name}_t2.nii.gz").unlink()
    seg_path = cases[1] / f"{cases[1].name}_seg.nii.gz"
    seg = nib.load(seg_path)
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), seg_path)
    capsys.readouterr()
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{cases[0].name}_t2" in out and f"{cases[1].name}_seg.nii.gz" in out and "7" in out
    assert main(["data", "check", str(tmp_path / "missing")]) != 0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_mode_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = capsys.readouterr().out
    assert "lightning_fedseg.FederatedStrategy" in resolved
    assert "modalities:" in resolved and "in_channels" not in resolved  # linked from data.modalities


@pytest.mark.slow
def test_fit_then_test_from_the_fedavg_config(small_dataset, tmp_path, capsys):
    common = [
        "--config", str(ROOT / "configs" / "fedavg.yaml"),
        "--data.init_args.data_root", str(small_dataset),
        "--data.init_args.batch_size", "32",
        "--model.init_args.compute_hd95", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]",
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_epochs", "2"])
    out = capsys.readouterr().out
    assert "Validation Dice after the last round" in out and "global" in out
    ckpts = sorted((tmp_path / "runs" / "fedavg").rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    ckpt = torch.load(ckpts[-1], weights_only=False)
    assert ckpt["federation"]["completed_rounds"] == 2
    assert ckpt["hyper_parameters"]["in_channels"] == 1
    main(["test", *common, "--ckpt_path", str(ckpts[-1])])
    assert "test/dice" in capsys.readouterr().out


# One of each kind (a server optimizer, a robust rule, client steps with and without site state, a
# robustness drill: an attack around bucketed centered clipping);
# every config is resolved by `test_every_mode_config_resolves`.
ALGORITHM_CONFIGS = [
    ROOT / "configs" / f"{name}.yaml"
    for name in ("fedadam", "krum", "scaffold", "fedbn", "under_attack", "fedavg_patient_dp")
]


@pytest.mark.slow
@pytest.mark.parametrize("config", ALGORITHM_CONFIGS, ids=[c.stem for c in ALGORITHM_CONFIGS])
def test_every_algorithm_config_trains_a_round(config, small_dataset, tmp_path):
    args = [
        "fit", "--config", str(config),
        "--data.init_args.data_root", str(small_dataset),
        "--data.init_args.batch_size", "32",
        "--model.init_args.compute_hd95", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    if config.stem == "krum":  # 3 sites: Krum needs n > 2f + 2
        args += ["--trainer.strategy.init_args.server.init_args.num_byzantine", "0"]
        args += ["--trainer.strategy.init_args.server.init_args.multi", "2"]
    main(args)
    (last,) = (tmp_path / "runs" / config.stem).rglob("last.ckpt")
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["federation"]["completed_rounds"] == 1
    assert ckpt["federation"]["history"][0]["succeeded"] == ["1", "2", "3"]
    if config.stem == "under_attack":  # one institution drawn with the seed sent the attack, and is named
        record = ckpt["federation"]["history"][0]
        assert record["byzantine/count"] == 1.0 and sum(k.startswith("byzantine/site/") for k in record) == 1
    if config.stem == "fedavg_patient_dp":  # each institution's own accountant, calibrated to its target
        accounts = ckpt["federation"]["client_states"]
        assert sorted(accounts) == ["1", "2", "3"]
        for site in accounts:
            epsilon = ckpt["federation"]["history"][0][f"privacy/{site}/epsilon"]
            assert 0 < epsilon <= 8.0 and accounts[site]["patient_dp"]["history"][0][2] == 4
