"""The hub of a federation over NVIDIA FLARE: a ``ModelController`` that relays the sites' exchanges.

The FLARE server runs this controller as the job's workflow (the job built by
:func:`~lightning_fedseg.deploy.job.write_job`). Its first task names the federation (the sites, in
order) and the package version; then every task carries the combination (:func:`.relay.relay`) of
the sites' previous answers: the FedAvg sum, a hand-over, a flag, a gathered public key. The job
ends when every site has said ``done``.

Each answer is attributed to the FLARE client that sent it: the name FLARE authenticated from the
client's provisioned certificate (mutual TLS), which must equal the site the message claims.

Every exchange is recorded in the server's log, one line ``fedseg exchange: {json}`` each: the op,
what it was for, the round, each site's bytes and, for a round's weighted sum, each site's sample
weight and site count. That is what the hub saw.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from lightning_fedseg.deploy.hub_step import HubStep
from lightning_fedseg.deploy.relay import Message, RelayError, contribution_weights, relay
from lightning_fedseg.federation.flare_transport import flare_client_name

__all__ = ["RECORD_PREFIX", "FederatedController"]

RECORD_PREFIX = "fedseg exchange: "
CONTRIBUTION = "weighted all-reduce"


class FederatedController(ModelController):
    """Relays the collectives of the sites' :class:`~lightning_fedseg.deploy.flare_transport.FlareTransport`.

    Args:
        sites: the federation's sites, in the order of the study's data (FLARE client names).
        version: the lightning_fedseg version that built the job; the server's must equal it.
        exchange_timeout: seconds to wait for every site's answer to one exchange (a round's
            local training included); a site missing after that aborts the job, naming it.
        server: the study's ``server`` config (``class``, ``args``: :func:`.job.plain_spec`); a rule
            that needs each site's own state runs here (:mod:`.hub_step`).
    """

    def __init__(
        self,
        sites: list[str],
        version: str,
        exchange_timeout: float = 1800.0,
        server: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(allow_empty_global_weights=True, task_check_period=0.05)
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"Expected distinct site names, but got {sites}.")
        self.sites = [str(s) for s in sites]
        self.targets = [flare_client_name(s) for s in self.sites]
        self.version = version
        self.exchange_timeout = float(exchange_timeout)
        self.exchanges = 0
        self.server = server  # the YAML's `server` (as `class`/`args`)
        self.hub_step: HubStep | None = None

    def _messages(self, results: list[FLModel], seq: int) -> list[Message]:
        by_site: dict[str, FLModel] = {}
        for result in results:
            meta = result.meta or {}
            client, site = str(meta.get("client_name")), str(meta.get("site"))
            if flare_client_name(site) != client:
                raise RelayError(f"Exchange {seq}: FLARE client {client!r} sent a message as site {site!r}.")
            by_site[site] = result
        missing = [s for s in self.sites if s not in by_site]
        if missing:
            raise RelayError(
                f"Exchange {seq}: no answer from sites {missing} within {self.exchange_timeout:.0f} s; the job stops."
                " Each site's last round checkpoint is intact and resumable."
            )
        out = []
        for site in self.sites:
            meta, params = by_site[site].meta, by_site[site].params or {}
            array = np.asarray(params.get("x", np.zeros(0)))
            out.append(Message(site, str(meta.get("op")), int(meta.get("seq", -1)), array, int(meta.get("src", -1))))
        return out

    def _record(self, messages: list[Message], results: list[FLModel], seconds: float) -> None:
        meta = (results[0].meta or {}) if results else {}
        what = str(meta.get("what", ""))
        record: dict[str, Any] = {
            "seq": messages[0].seq,
            "op": messages[0].op,
            "what": what,
            "round": int(meta.get("round", -1)),
            "seconds": round(seconds, 4),
            "bytes": {m.site: int(m.array.nbytes) for m in messages},
            "pids": {str((r.meta or {}).get("site")): (r.meta or {}).get("pid") for r in results},
        }
        if messages[0].op == "aggregate" and self.hub_step is not None:  # the hub's rule's own figures
            record["server_metrics"] = {k: float(v) for k, v in self.hub_step.server.metrics().items()}
        if what == CONTRIBUTION:
            weights = contribution_weights(messages)
            record["weights"] = {s: w for s, (w, _) in weights.items()}
            record["site_counts"] = {s: c for s, (_, c) in weights.items()}
        self.info(RECORD_PREFIX + json.dumps(record))

    def _combine(self, messages: list[Message], results: list[FLModel]) -> np.ndarray:
        """The relay's combination, or, for ``aggregate``, the study's rule run at the hub."""
        meta = results[0].meta or {}
        if messages[0].op != "aggregate":
            return relay(messages)
        return self._hub_step().step([m.array for m in messages], meta["layout"], int(meta.get("round", -1)))

    def _hub_step(self) -> HubStep:
        if self.hub_step is None:
            if self.server is None:
                raise RelayError("The sites sent their states to the hub, but the job names no server step.")
            self.hub_step = HubStep(self.server, self.sites)
        return self.hub_step

    def run(self) -> None:
        from lightning_fedseg import __version__

        if self.version != __version__:
            raise RuntimeError(
                f"The job was built by lightning_fedseg {self.version}, but the FLARE server runs {__version__}."
            )
        self.info(f"lightning_fedseg {__version__}: a federation of {self.sites}")
        data = FLModel(params={"x": np.zeros(0)}, meta={"sites": self.sites, "version": self.version, "seq": 0})
        while True:
            started = time.perf_counter()
            results = self.send_model_and_wait(
                task_name="train", data=data, targets=self.targets, timeout=int(self.exchange_timeout)
            )
            messages = self._messages(results, self.exchanges + 1)
            combined = self._combine(messages, results)
            self.exchanges = messages[0].seq
            self._record(messages, results, time.perf_counter() - started)
            if messages[0].op == "done":
                self.info(f"Every site is done after {self.exchanges} exchanges.")
                return
            data = FLModel(params={"x": combined}, meta={"seq": messages[0].seq, "op": messages[0].op})
