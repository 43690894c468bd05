"""dpseg's federation on Flower (flwr >= 1.10; written against 1.42), one module per idea:

- ``config``: the Flower run config of a dpseg run (the whole ``FederatedConfig`` as one
  JSON string ``dpseg-config``, plus ``out``, ``num-sites``, timeouts).
- ``client``: the ClientApp, one dpseg ``Site`` per SuperNode; what leaves a site.
- ``server``: the ServerApp, dpseg's strategies over the sites and the report;
  ``remote``: its view of the sites and how it reaches them.
- ``secagg``: secure aggregation with Flower's SecAgg+ (--secagg).
- ``traffic``: what the coordinator sends and receives, counted and written down.
- ``deploy``, ``tls``: a loopback deployment (a SuperLink and one SuperNode per site), with
  TLS and SuperNode authentication (--tls); docs/flower.md runs the same on many machines.

The checks the server applies to the sites' updates are in dpseg.federated.update_checks,
shared with the in-process simulator. ``client_app`` and ``server_app`` below are the
Flower App's components (``dpseg.federated.flower:client_app``).
"""

from dpseg.federated.flower.client import make_client_app
from dpseg.federated.flower.config import run_config_for
from dpseg.federated.flower.remote import RemoteSite
from dpseg.federated.flower.server import make_server_app, server_state_path

__all__ = [
    "RemoteSite",
    "client_app",
    "make_client_app",
    "make_server_app",
    "run_config_for",
    "server_app",
    "server_state_path",
]

client_app = make_client_app()
server_app = make_server_app()
