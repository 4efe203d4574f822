"""``lightning-fedseg deploy``: one command for each party of a federation over NVIDIA FLARE.

* the coordinator: ``deploy provision`` (the FLARE project and every party's startup kit) and
  ``deploy submit`` (the job, built from the study's YAML);
* the server and each site: ``deploy start KIT`` runs the FLARE server or client of the kit in the
  foreground (the command FLARE's own ``startup/start.sh`` runs, without its restart loop);
* each site's trainer: ``lightning-fedseg fit --config <study.yaml>
  --trainer.strategy.init_args.flare_profile <kit>/local/fedseg_attach.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "start_command"]


def start_command(kit: str | Path) -> list[str]:
    """The command that runs the FLARE server or client of ``kit`` (as FLARE's ``start.sh`` does)."""
    kit = Path(kit).resolve()
    startup = kit / "startup"
    if (startup / "fed_server.json").is_file():
        module, config, extra = "nvflare.private.fed.app.server.server_train", "fed_server.json", []
    elif (startup / "fed_client.json").is_file():
        module, config, extra = "nvflare.private.fed.app.client.client_train", "fed_client.json", [f"uid={kit.name}"]
    else:
        raise FileNotFoundError(f"{str(kit)!r} is not a FLARE server or client startup kit (no startup/fed_*.json).")
    return [
        sys.executable, "-u", "-m", module, "-m", str(kit), "-s", config,
        "--set", "secure_train=true", *extra, "org=consortium", "config_folder=config",
    ]  # fmt: skip


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-fedseg deploy", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    prov = verbs.add_parser("provision", help="Make the FLARE project and every party's startup kit.")
    prov.add_argument("--sites", nargs="+", required=True, help="The institutions, as named in the study's data.")
    prov.add_argument("--workspace", required=True, type=Path, help="Where the kits go (a new folder).")
    prov.add_argument("--server-host", default="localhost", help="The FLARE server's host name, as sites reach it.")
    prov.add_argument("--fed-port", type=int, default=8002)
    prov.add_argument("--admin-port", type=int, default=8003)
    prov.add_argument("--site-ports", type=int, nargs="*", help="Each site's local listener for its trainer.")
    start = verbs.add_parser("start", help="Run the FLARE server or client of a startup kit (foreground).")
    start.add_argument("kit", type=Path)
    sub = verbs.add_parser("submit", help="Build the study's FLARE job and submit it.")
    sub.add_argument("--config", required=True, type=Path, help="The study's YAML (as every site runs it).")
    sub.add_argument("--startup-kit", required=True, type=Path, help="The coordinator's admin kit.")
    sub.add_argument("--job-dir", type=Path, default=None, help="Where to write the job (default: beside the kit).")
    sub.add_argument("--wait", type=float, default=None, help="Follow the job for up to this many seconds.")
    args = parser.parse_args(list(argv))

    if args.verb == "provision":
        from lightning_fedseg.deploy.provision import provision

        kits = provision(
            args.workspace, args.sites, args.server_host, args.fed_port, args.admin_port, args.site_ports or None
        )
        print(f"server kit: {kits.server}\nadmin kit:  {kits.admin}")
        for site, kit in kits.sites.items():
            print(f"site {site}: {kit}  (attach profile {kits.attach_profile(site)})")
        return 0
    if args.verb == "start":
        command = start_command(args.kit)
        os.chdir(args.kit)
        os.execv(command[0], command)
    import json

    from lightning_fedseg.deploy.job import check_study, submit, write_job
    from lightning_fedseg.deploy.provision import FEDERATION_FILE

    strategy = check_study(args.config)
    federation = json.loads((args.startup_kit / "local" / FEDERATION_FILE).read_text())
    timeout = float(strategy.get("timeout", 1800.0))
    job = write_job(
        args.job_dir or args.startup_kit.parent / "jobs", federation["sites"], timeout, server=strategy.get("server")
    )
    job_id, status = submit(job, args.startup_kit, args.wait)
    print(f"submitted job {job_id} ({job})" + (f": {status}" if status else ""))
    return 0 if status in (None, "FINISHED:COMPLETED") else 1
