"""The ``lightning-fedseg`` command: a LightningCLI plus the data subcommands.

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's own (configs in ``configs/``);
``synth`` writes the synthetic multi-institution BraTS-layout data set and ``data check ROOT``
validates a BraTS/FeTS folder, reporting every bad case at once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

__all__ = ["FedSegCLI", "main"]

EXTRA_SUBCOMMANDS = {
    "synth": "Write the synthetic multi-institution data set (BraTS layout, real NIfTI files).",
    "deploy": "Across institutions over NVIDIA FLARE: provision | start KIT | submit (see docs/deployment.md).",
    "data": "Data utilities: `data check ROOT` validates every case of a BraTS/FeTS folder.",
}


class FedSegCLI(LightningCLI):
    """LightningCLI with the segmentation module and the federated DataModule as defaults.

    The model's input channels and target follow the data's modalities and target, so a config
    names them once.
    """

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.modalities", "model.init_args.in_channels", compute_fn=len)
        parser.link_arguments("data.target", "model.init_args.target")

    @override
    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar false` drops the configs' progress bar instead of failing.
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("enable_progress_bar", True) is not False:
            return
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [c for c in callbacks if "ProgressBar" not in str(getattr(c, "class_path", c))]

    def after_fit(self) -> None:  # not an override: LightningCLI calls `after_<subcommand>` by name
        print_site_summary(self.trainer.callback_metrics, self.trainer)


def print_site_summary(metrics: Any, trainer: Any) -> None:
    """Print the last validation's global and per-site Dice as a table (rank zero only)."""
    if not trainer.is_global_zero:
        return
    from rich.console import Console
    from rich.table import Table

    values = {k: float(v) for k, v in metrics.items() if k.startswith("val/") and k.endswith("/dice")}
    if "val/dice" in metrics:
        values["val/dice"] = float(metrics["val/dice"])
    if not values:
        return
    strategy = trainer.strategy
    title = "Validation Dice after the last round"
    if hasattr(strategy, "mode"):
        title += f" ({strategy.mode.name}, {trainer.current_epoch} rounds)"
    table = Table(title=title)
    table.add_column("site")
    table.add_column("Dice", justify="right")
    site_names = list(getattr(trainer.datamodule, "site_names", None) or [])
    order = {name: i for i, name in enumerate(site_names)}
    sites = [k.removeprefix("val/").removesuffix("/dice") for k in values if k != "val/dice"]
    for site in sorted(sites, key=lambda name: (order.get(name, len(order)), name)):
        table.add_row(site, f"{values[f'val/{site}/dice']:.4f}")
    if "val/dice" in values:
        table.add_row("[bold]global (all sites' volumes)[/bold]", f"[bold]{values['val/dice']:.4f}[/bold]")
    Console().print(table)


def _synth(argv: Sequence[str]) -> int:
    from lightning_fedseg.data.synthetic import write_synthetic_dataset

    parser = argparse.ArgumentParser(prog="lightning-fedseg synth", description=EXTRA_SUBCOMMANDS["synth"])
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument("--num_subjects", type=int, default=None, help="subjects in all (default: generator's)")
    parser.add_argument("--num_sites", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--full_size", action="store_true", help="240x240x155 volumes, as BraTS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naming", choices=("brats", "fets"), default="brats")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--num_workers", type=int, default=1, help="processes generating subjects in parallel")
    args = parser.parse_args(list(argv))
    kwargs: dict[str, Any] = {
        "num_sites": args.num_sites,
        "shape": (240, 240, 155) if args.full_size else tuple(args.shape),
        "seed": args.seed,
        "naming": args.naming,
        "overwrite": args.overwrite,
        "num_workers": args.num_workers,
    }
    if args.num_subjects is not None:
        kwargs["num_subjects"] = args.num_subjects
    dataset = write_synthetic_dataset(args.out, **kwargs)
    print(f"wrote {dataset}")
    return 0


def _data(argv: Sequence[str]) -> int:
    from lightning_fedseg.data.validation import check_dataset

    parser = argparse.ArgumentParser(prog="lightning-fedseg data", description=EXTRA_SUBCOMMANDS["data"])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate every case under ROOT and report all problems")
    check.add_argument("root")
    check.add_argument("--modalities", nargs="+", default=["flair", "t1", "t1ce", "t2"])
    check.add_argument("--label_convention", choices=("brats", "brats2023"), default="brats")
    check.add_argument("--no_seg", action="store_true", help="cases without segmentation (inference data)")
    check.add_argument("--workers", type=int, default=1, help="processes checking cases in parallel")
    check.add_argument(
        "--reorient", action="store_true", help="training will reorient to RAS: non-axial voxel axes are no problem"
    )
    args = parser.parse_args(list(argv))
    if args.workers < 1:
        parser.error(f"Expected `--workers` to be a positive integer, but got {args.workers}.")
    try:
        report = check_dataset(
            args.root,
            modalities=args.modalities,
            convention=args.label_convention,
            require_seg=not args.no_seg,
            require_axial=not args.reorient,
            workers=args.workers,
        )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-fedseg`` and ``python -m lightning_fedseg``."""
    import lightning_fedseg  # noqa: F401  (registers the strategy short names)
    from lightning_fedseg.data import FederatedDataModule
    from lightning_fedseg.module import BrainTumorSegmentation

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "synth":
        return _synth(args[1:])
    if args and args[0] == "data":
        return _data(args[1:])
    if args and args[0] == "deploy":
        from lightning_fedseg.deploy.cli import main as deploy_main

        return deploy_main(args[1:])
    if not args or args[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<10} {text}" for name, text in EXTRA_SUBCOMMANDS.items())
        with contextlib.suppress(SystemExit):
            _build_cli(["--help"])
        print(f"\nlightning-fedseg also has:\n{extra}\n")
        return 0 if args else 2
    _build_cli(None if argv is None else args, model=BrainTumorSegmentation, data=FederatedDataModule)
    return 0


def _build_cli(args: list[str] | None, model: Any = None, data: Any = None) -> FedSegCLI:
    if model is None:
        from lightning_fedseg.data import FederatedDataModule
        from lightning_fedseg.module import BrainTumorSegmentation

        model, data = BrainTumorSegmentation, FederatedDataModule
    return FedSegCLI(
        model,
        data,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    sys.exit(main())
