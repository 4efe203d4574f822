"""The coordinator's first step: a FLARE project for the study's institutions, provisioned by FLARE.

:func:`provision` writes FLARE's ``project.yml`` (the server, one FLARE client per institution,
named as in the study's data, and the coordinator's admin identity), runs ``nvflare provision``
(FLARE makes the project's certificate authority and every party's certificate and startup kit),
then adds what this package needs to each kit:

* every kit's ``local/resources.json``: FLARE's own component allow-list plus exactly the classes a
  job of this package uses (:data:`ALLOWED`);
* each site's ``local/fedseg_attach.json``: the attach profile its trainer passes as
  ``trainer.strategy.init_args.flare_profile``. The trainer reaches its own FLARE client over the
  client's local listener (loopback by default); ``secure_mode`` makes FLARE authenticate and
  encrypt those messages with the site's provisioned credentials;
* the admin kit's ``local/fedseg_federation.json``: the sites, in order, for ``deploy submit``.

Nothing here handles a key or a certificate: FLARE makes them, and they never leave the kits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_fedseg.federation.flare_transport import flare_client_name

__all__ = ["ALLOWED", "ATTACH_PROFILE", "FEDERATION_FILE", "Kits", "project_yaml", "provision"]

ALLOWED = (
    "lightning_fedseg.deploy.controller.FederatedController",
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
)
FEDERATION_FILE = "fedseg_federation.json"
ATTACH_PROFILE = "fedseg_attach.json"
ATTACH_ID = "lightning_fedseg"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # FLARE's rule for client names


@dataclass(frozen=True)
class Kits:
    """Where ``nvflare provision`` put the startup kits."""

    server: Path
    sites: dict[str, Path]
    admin: Path

    def attach_profile(self, site: str) -> Path:
        return self.sites[site] / "local" / ATTACH_PROFILE


def project_yaml(
    sites: Sequence[str],
    server_host: str = "localhost",
    fed_port: int = 8002,
    admin_port: int = 8003,
    site_ports: Sequence[int] | None = None,
    site_host: str = "localhost",
    admin: str = "admin@consortium.org",
    project: str = "fedseg",
) -> dict[str, Any]:
    """FLARE's ``project.yml`` for ``sites`` (pure).

    ``site_ports``: each site's local listener for its trainer (default ``admin_port + 1 + i``).

    Example:
        >>> p = project_yaml(["1", "2"], fed_port=9002, admin_port=9003)
        >>> [(x["name"], x["type"]) for x in p["participants"]]
        [('localhost', 'server'), ('site-1', 'client'), ('site-2', 'client'), ('admin@consortium.org', 'admin')]
        >>> p["participants"][2]["listening_host"]["port"]
        9005
    """
    bad = [s for s in sites if not _CLIENT_NAME.match(s)]
    if bad or not sites or len(set(sites)) != len(sites):
        raise ValueError(
            f"Expected distinct site names of letters, digits, '-' and '_' (FLARE client names), but got {list(sites)}."
        )
    ports = list(site_ports) if site_ports is not None else [admin_port + 1 + i for i in range(len(sites))]
    if len(ports) != len(sites):
        raise ValueError(f"Expected one port per site ({len(sites)}), but got {ports}.")
    server = {"name": server_host, "type": "server", "org": "consortium"}
    participants: list[dict[str, Any]] = [{**server, "fed_learn_port": fed_port, "admin_port": admin_port}]
    for site, port in zip(sites, ports, strict=True):
        listener = {"scheme": "tcp", "default_host": site_host, "port": port, "connection_security": "clear"}
        name = flare_client_name(site)
        participants.append({"name": name, "type": "client", "org": "consortium", "listening_host": listener})
    participants.append({"name": admin, "type": "admin", "org": "consortium", "role": "project_admin"})
    return {
        "api_version": 3,
        "name": project,
        "description": "lightning_fedseg federation",
        "participants": participants,
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def _allow(kit: Path) -> None:
    local = kit / "local"
    config = json.loads((local / "resources.json.default").read_text())
    allowed = config.setdefault("class_allow_list", [])
    allowed.extend(c for c in ALLOWED if c not in allowed)
    (local / "resources.json").write_text(json.dumps(config, indent=2) + "\n")


def provision(
    workspace: str | Path,
    sites: Sequence[str],
    server_host: str = "localhost",
    fed_port: int = 8002,
    admin_port: int = 8003,
    site_ports: Sequence[int] | None = None,
    admin: str = "admin@consortium.org",
    project: str = "fedseg",
) -> Kits:
    """Provision the project in ``workspace`` (which must not hold one) and return its kits."""
    workspace = Path(workspace).resolve()
    spec = project_yaml(sites, server_host, fed_port, admin_port, site_ports, admin=admin, project=project)
    root = workspace / project
    if root.exists():
        raise FileExistsError(f"{str(root)!r} exists: provision into a new workspace (its CA would be replaced).")
    workspace.mkdir(parents=True, exist_ok=True)
    project_file = workspace / "project.yml"
    project_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_file), "-w", str(workspace)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`nvflare provision` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    prod = root / "prod_00"
    kits = Kits(prod / server_host, {s: prod / flare_client_name(s) for s in sites}, prod / admin)
    # each trainer reaches its FLARE client at the listener the project gives the site
    listeners = [p["listening_host"] for p in spec["participants"] if p["type"] == "client"]
    for kit in (kits.server, *kits.sites.values()):
        _allow(kit)
    for (site, kit), listener in zip(kits.sites.items(), listeners, strict=True):
        profile = {
            "schema_version": 1,
            "execution_mode": "attach",
            "attach_id": ATTACH_ID,
            "site_name": flare_client_name(site),
            "connect_url": f"tcp://{listener['default_host']}:{listener['port']}",
            "connection_security": "clear",
            "secure_mode": True,
            "ca_cert": str(kit / "startup" / "rootCA.pem"),
            "job_wait_timeout": None,
        }
        kits.attach_profile(site).write_text(json.dumps(profile, indent=2) + "\n")
    federation = {"sites": list(sites), "server": f"{server_host}:{fed_port}", "admin": admin}
    (kits.admin / "local" / FEDERATION_FILE).write_text(json.dumps(federation, indent=2) + "\n")
    return kits
