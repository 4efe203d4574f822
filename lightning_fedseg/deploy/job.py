"""The FLARE job of a study: configuration only, built from the study's YAML; and its submission.

A job names the controller (:class:`~lightning_fedseg.deploy.controller.FederatedController`,
with the sites, the package version and the exchange timeout) and, for every site, FLARE's
``ClientAPIExecutor`` in attach mode. It carries no code: every party runs the pip-installed
package, and the controller and every site refuse a version other than the job's.

The study's YAML decides what can run across institutions; :func:`check_study` refuses, naming
the key, what has no sound meaning over the hub: ``cds`` (it pools the institutions' data) and the
``ByzantineServer`` attack drill. A server step that needs every site's own state (Krum, the
median, ...) goes into the job and runs at the hub (:mod:`.hub_step`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_fedseg.deploy.hub_step import import_class

__all__ = ["check_study", "submit", "write_job"]


def _class(spec: Any) -> type | None:
    """The class a ``class_path`` config (or a bare path) names; ``None`` where it names none."""
    path = spec.get("class_path") if isinstance(spec, Mapping) else spec
    if not isinstance(path, str):
        return None
    try:
        return import_class(path)
    except AttributeError:
        return None


def plain_spec(spec: Any) -> Any:
    """A ``class_path``/``init_args`` config as ``class``/``args`` (nested ones too): FLARE's job
    configuration reads a ``class_path`` or ``path`` entry as a component of its own to build.

    Example:
        >>> plain_spec({"class_path": "a.B", "init_args": {"inner": {"class_path": "a.C"}, "k": 2}})
        {'class': 'a.B', 'args': {'inner': {'class': 'a.C', 'args': {}}, 'k': 2}}
    """
    if isinstance(spec, Mapping) and "class_path" in spec:
        return {
            "class": spec["class_path"],
            "args": {k: plain_spec(v) for k, v in (spec.get("init_args") or {}).items()},
        }
    if isinstance(spec, list):
        return [plain_spec(v) for v in spec]
    return spec


def check_study(config: str | Path) -> dict[str, Any]:
    """The strategy's ``init_args`` of the study at ``config``, after refusing what FLARE cannot run."""
    path = Path(config)
    study = yaml.safe_load(path.read_text()) or {}
    strategy = ((study.get("trainer") or {}).get("strategy")) or {}
    args = dict(strategy.get("init_args") or {}) if isinstance(strategy, Mapping) else {}
    mode = _class(args.get("mode"))
    if mode is not None and mode.__name__ == "CDS":
        raise ValueError(
            f"{str(path)!r}: `trainer.strategy.init_args.mode` is cds, which pools the institutions' data;"
            " it cannot run across institutions."
        )
    server = _class(args.get("server"))
    if server is not None and server.__name__ == "ByzantineServer":
        raise ValueError(
            f"{str(path)!r}: `trainer.strategy.init_args.server` is ByzantineServer, an attack drill; it has no"
            " meaning across real institutions. HINT: run the drill in one process."
        )
    return args


def write_job(
    out: str | Path,
    sites: Sequence[str],
    timeout: float = 1800.0,
    name: str = "lightning_fedseg",
    server: Mapping[str, Any] | None = None,
) -> Path:
    """Write the job folder ``out/name`` for ``sites``; returns it. ``server``: the study's server
    step config, which the hub runs where it needs each site's state."""
    from lightning_fedseg import __version__
    from lightning_fedseg.deploy.provision import ATTACH_ID

    job = Path(out).resolve() / name
    config = job / "app" / "config"
    config.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "resource_spec": {}, "min_clients": len(sites), "deploy_map": {"app": ["@ALL"]}}
    server_config = {
        "format_version": 2,
        "server": {"heart_beat_timeout": 600, "task_request_interval": 0.05},
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [],
        "workflows": [
            {
                "id": "fedseg",
                "path": "lightning_fedseg.deploy.controller.FederatedController",
                "args": {
                    "sites": list(sites),
                    "version": __version__,
                    "exchange_timeout": float(timeout),
                    "server": plain_spec(server) if isinstance(server, Mapping) else None,
                },
            }
        ],
    }
    executor = {
        "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
        "args": {
            "execution_mode": "attach",
            "attach_id": ATTACH_ID,
            "attach_timeout": float(timeout),
            "task_wait_timeout": float(timeout),
            "params_exchange_format": "numpy",
            "server_expected_format": "numpy",
        },
    }
    client = {
        "format_version": 2,
        "executors": [{"tasks": ["*"], "executor": executor}],
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [],
    }
    for file, content in (
        (job / "meta.json", meta),
        (config / "config_fed_server.json", server_config),
        (config / "config_fed_client.json", client),
    ):
        file.write_text(json.dumps(content, indent=2) + "\n")
    return job


def submit(job: str | Path, admin_kit: str | Path, wait: float | None = None) -> tuple[str, str | None]:
    """Submit ``job`` with the coordinator's admin kit; with ``wait``, follow it until it ends (or
    ``wait`` seconds pass). Returns ``(job id, final status or None)``."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from lightning_fedseg.deploy.provision import FEDERATION_FILE

    kit = Path(admin_kit).resolve()
    federation = json.loads((kit / "local" / FEDERATION_FILE).read_text())
    session = new_secure_session(federation["admin"], str(kit))
    try:
        job_id = str(session.submit_job(str(Path(job).resolve())))
        if wait is None:
            return job_id, None
        session.monitor_job(job_id, timeout=wait, poll_interval=0.5)
        return job_id, str(session.get_job_meta(job_id).get("status"))
    finally:
        session.close()
