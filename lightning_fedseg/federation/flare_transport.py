"""One institution's side of a federation whose hub is an NVIDIA FLARE server.

The institution runs the ordinary ``lightning-fedseg fit --config <study.yaml>`` with
``trainer.strategy.init_args.flare_profile`` naming its FLARE attach profile: one process and one
Trainer for the whole job. The process attaches to the institution's own FLARE client (Client API
attach mode: ``nvflare.client.init``), which dials out to the FLARE server over mutually
authenticated TLS with the certificate its startup kit was provisioned with; nothing dials in.

Every collective of the :class:`~lightning_fedseg.federation.transport.Transport` is one exchange
with the hub (:class:`~lightning_fedseg.deploy.controller.FederatedController`): the site sends its
array with ``nvflare.client.send`` and receives the combined array as the next task
(``nvflare.client.receive``). So the FedAvg sum, IIL/CIIL's hand-overs, DP-FedAvg's noised sums,
pairwise masking's key exchange and masked sums, the round's metrics and flags all travel the same
way as over torch.distributed, and a FLARE run equals the simulation for the same YAML and seeds.

Decisions:

* **The federation's sites are the hub's.** The controller's first task names the sites (in
  order) and the package version; the site refuses a version other than its own and a federation
  that does not name it.
* **Only arrays cross**, as numpy (FLARE's FOBS serialization, never pickle): weights, weighted
  sums, counts, flags, public keys, metrics.
* **Masking keys are signed.** Each round's public key is signed with the site's provisioned
  certificate and checked by every peer against the project's CA (:mod:`.signed_keys`), so the
  hub relays the key exchange but cannot substitute a key.
* **Rules that need each site's own state run at the hub** (Krum, the median, ...): each site's
  state goes to the hub only (:meth:`FlareTransport.step_at_hub`), never to the other sites; the
  hub runs the rule and sends the new global state back.
* **End.** After ``fit`` the site sends ``done``; the controller ends the job when every site has.
  A site that stops early (an error, an abort) only detaches: the controller's timeout then ends
  the job for everyone, and each site's last round checkpoint is intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_fedseg.federation.transport import CommStats, Transport, flatten_state, unflatten_state

if TYPE_CHECKING:
    from lightning_fedseg.federation.signed_keys import SiteIdentity

__all__ = ["FLARE_PREFIX", "FlareSession", "FlareTransport", "flare_client_name"]

FLARE_PREFIX = "site-"


def flare_client_name(site: str) -> str:
    """The FLARE client name of an institution (FLARE reads a name of digits only as a number).

    Example:
        >>> flare_client_name("1")
        'site-1'
    """
    return f"{FLARE_PREFIX}{site}"


class FlareSession:
    """The attached Client API session of one site: the exchanges, in order.

    Args:
        profile: the site's attach profile (JSON written by ``lightning-fedseg deploy provision``).
        timeout: how long to wait for the hub's answer to one exchange.
    """

    def __init__(self, profile: str | Path, timeout: timedelta | None = None) -> None:
        self.profile = Path(profile)
        if not self.profile.is_file():
            raise FileNotFoundError(f"The FLARE attach profile {str(self.profile)!r} does not exist.")
        profile_json = json.loads(self.profile.read_text())
        self.site = str(profile_json["site_name"]).removeprefix(FLARE_PREFIX)
        ca_cert = profile_json.get("ca_cert")  # in the site's kit, beside client.crt and client.key
        self.startup = Path(ca_cert).parent if ca_cert else None
        self.timeout = timeout
        self.seq = 0
        self.what = ""
        self.round = -1
        self._flare: Any = None
        self._identity: SiteIdentity | None = None
        self.sites: list[str] = []
        self.job_id = ""

    def start(self) -> list[str]:
        """Attach to the site's FLARE client and take the controller's first task (blocks until the job runs)."""
        import nvflare.client as flare

        from lightning_fedseg import __version__

        self._flare = flare
        flare.init(config_file=str(self.profile))
        first = self._receive("the job's first task")
        meta = dict(first.meta or {})
        self.sites = [str(s) for s in meta.get("sites", [])]
        self.job_id = str(flare.get_job_id())
        version = str(meta.get("version"))
        if version != __version__:
            self.close(success=False)
            raise RuntimeError(
                f"The FLARE job was built by lightning_fedseg {version}, but this site runs"
                f" {__version__}. HINT: every party installs the same version."
            )
        if self.site not in self.sites:
            self.close(success=False)
            raise RuntimeError(
                f"The attach profile {str(self.profile)!r} names site {self.site!r}, but the FLARE job's"
                f" federation is {self.sites}."
            )
        return self.sites

    def _receive(self, what: str) -> Any:
        timeout = self.timeout.total_seconds() if self.timeout is not None else None
        model = self._flare.receive(timeout=timeout)
        if model is None or not self._flare.is_running():
            raise RuntimeError(f"The FLARE job ended or was aborted while site {self.site!r} waited for {what}.")
        return model

    def _send(self, op: str, array: np.ndarray, src: int = -1, extra: Mapping[str, Any] | None = None) -> None:
        from nvflare.app_common.abstract.fl_model import FLModel

        self.seq += 1
        meta = {"op": op, "seq": self.seq, "src": src, "site": self.site, "what": self.what, "round": self.round}
        meta.update(extra or {})
        meta["pid"] = os.getpid()  # so the hub's record shows one trainer process per site for the whole job
        self._flare.send(FLModel(params={"x": array}, meta=meta))

    def exchange(self, op: str, array: np.ndarray, src: int = -1, extra: Mapping[str, Any] | None = None) -> np.ndarray:
        """Send this site's ``array`` for ``op`` and return the hub's combination of every site's."""
        self._send(op, array, src, extra)
        reply = self._receive(f"exchange {self.seq} ({self.what or op})")
        got = dict(reply.meta or {})
        if got.get("seq") != self.seq:
            raise RuntimeError(
                f"Site {self.site!r} expected the answer to exchange {self.seq}, but the hub answered {got.get('seq')}."
            )
        return np.asarray(reply.params["x"])

    def identity(self) -> SiteIdentity:
        """The site's provisioned certificate and key, beside the CA its attach profile names (read once)."""
        from lightning_fedseg.federation.signed_keys import SiteIdentity

        if self._identity is None:
            if self.startup is None or not (self.startup / "client.key").is_file():
                raise FileNotFoundError(
                    f"Masking over FLARE signs each round key with the site's certificate, but no client.key is"
                    f" beside the `ca_cert` of the attach profile {str(self.profile)!r}."
                )
            self._identity = SiteIdentity.from_kit(self.startup)
        return self._identity

    def close(self, success: bool) -> None:
        """Say ``done`` (after a successful fit) and detach."""
        if self._flare is None:
            return
        try:
            if success:
                self.what, self.round = "done", -1
                self._send("done", np.zeros(0))
        finally:
            flare, self._flare = self._flare, None
            flare.shutdown()


class FlareTransport(Transport):
    """The :class:`Transport` of one site over NVIDIA FLARE: every primitive is one exchange with the hub.

    Args:
        placement: ``{site: index}`` in the federation's order (one site per process).
        rank: this site's index.
        session: the attached session.
    """

    hub_runs_site_steps = True

    def __init__(self, placement: Mapping[str, int], rank: int, session: FlareSession) -> None:
        super().__init__(placement, rank, len(placement), session.timeout, torch.device("cpu"))
        self.session = session

    @property
    def active(self) -> bool:
        return True

    def _call(self, stats: CommStats, round_idx: int, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        self.session.what, self.session.round = what, round_idx
        return super()._call(stats, round_idx, what, fn, *args, **kw)

    def _all_reduce(self, flat: Tensor, op: str = "sum") -> None:
        out = self.session.exchange("max" if op == "max" else "sum", flat.detach().cpu().numpy())
        flat.copy_(torch.from_numpy(out).to(flat.device))

    def _broadcast(self, flat: Tensor, src: int) -> None:
        mine = flat.detach().cpu().numpy()
        out = self.session.exchange("broadcast", mine if src == self.rank else mine[:0], src)
        if src != self.rank:
            flat.copy_(torch.from_numpy(out).to(flat.device))

    def _all_gather(self, flat: Tensor) -> list[Tensor]:
        out = self.session.exchange("gather", flat.detach().cpu().numpy())
        return [torch.from_numpy(row).to(flat.device) for row in out]

    def _public_keys(
        self, public: bytes | None, members: Sequence[int], stats: CommStats, round_idx: int
    ) -> dict[int, bytes]:
        """The round public keys, each signed by its site's provisioned certificate and checked
        against the project's CA (:mod:`.signed_keys`): the hub relays them but cannot swap them."""
        from lightning_fedseg.federation.signed_keys import BLOB_SIZE, verify

        identity = self.session.identity()
        job = self.session.job_id
        blob = bytes(BLOB_SIZE) if public is None else identity.blob(job, round_idx, self.rank, public)
        mine = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        gathered = self._call(stats, round_idx, "signed key exchange", self._all_gather, mine)
        sites = {rank: site for site, rank in self.placement.items()}
        out = {}
        for rank in members:
            peer_blob = bytes(gathered[rank].cpu().numpy().tobytes())
            out[rank] = verify(peer_blob, identity.ca, flare_client_name(sites[rank]), job, round_idx, rank)
        return out

    def unresponsive_sites(self) -> str:
        return "a site or the FLARE hub (see the controller's log)"

    def step_at_hub(
        self,
        rows: Sequence[tuple[int, float, Mapping[str, Tensor]]],
        reference: Mapping[str, Tensor],
        param_keys: Sequence[str],
        stats: CommStats,
        round_idx: int,
        min_sites: int,
    ) -> tuple[dict[str, Tensor] | None, int]:
        """A rule that needs every site's own state (Krum, the median, ...) runs at the hub: this
        site's state goes to the hub only, and the new global state comes back. ``(None, count)``
        with fewer than ``min_sites`` sites."""
        size = sum(v.numel() for v in reference.values())
        flat = torch.zeros(size + 2, dtype=torch.float64)  # a failed site: weight 0
        for index, weight, state in rows:  # one site per process
            flat = flatten_state({k: state[k] for k in reference}, float(index), float(weight))
        if self.rank == 0:  # the round's global state, the same at every site, for the hub's rule
            flat = torch.cat([flat, flatten_state(reference)])
        layout = {
            "keys": list(reference),
            "shapes": [list(v.shape) for v in reference.values()],
            "dtypes": [str(v.dtype).removeprefix("torch.") for v in reference.values()],
            "param_keys": sorted(param_keys),
            "min_sites": int(min_sites),
        }

        def send() -> np.ndarray:
            return self.session.exchange("aggregate", flat.numpy(), extra={"layout": layout})

        out = torch.from_numpy(self._call(stats, round_idx, "site states to the hub", send))
        stats.bytes_sent += flat.numel() * 8
        stats.bytes_received += out.numel() * 8
        count = round(float(out[-1]))
        if out.numel() == 1:
            return None, count
        return unflatten_state(out[:-1], reference), count

    def reduce(self, value: Tensor, mean: bool) -> Tensor:
        """Lightning's ``strategy.reduce`` over the sites (logged metrics with ``sync_dist``, decisions)."""
        flat = value.detach().reshape(-1).to(torch.float64).cpu().clone()
        self._call(CommStats(), -1, "reduce of a logged value", self._all_reduce, flat)
        if mean:
            flat /= self.world_size
        return flat.reshape(value.shape).to(value.dtype).to(value.device)
