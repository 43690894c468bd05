"""Secure aggregation with Flower's SecAgg+ (``--secagg``): the server learns only the sum of
the sites' updates, never one site's.

Flower 1.42 runs SecAgg+ as ``secaggplus_mod`` on the ClientApp and ``SecAggPlusWorkflow`` on
the server. The workflow is written for the legacy Strategy API: it needs a ``LegacyContext``
holding a ``Strategy`` whose ``configure_fit`` names the nodes and their ``FitIns``, and the
mod expects the ClientApp's TRAIN reply in ``FitRes`` form. This module is the adapter:

- server: ``secure_round`` builds the FitIns of the chosen sites (the global weights as
  legacy Parameters in the model's key order, the round's settings), runs the workflow
  through four TRAIN stages (keys, shares, masked vectors, unmasking), and catches the
  unmasked result in ``_SumCatcher.aggregate_fit``.
- client: ``secagg_when_asked`` sends a TRAIN message through ``secaggplus_mod`` when it
  carries SecAgg+'s configuration (plain TRAIN messages pass by); ``fitins_weights`` reads
  the FitIns; ``pack_fitres`` builds the reply the mod masks.

What each site puts in: x_k = (w_k / W) delta_k, its weight-scaled update in float64, where
w_k = B / q_k is its public weight (strategies.py) and W the largest over the sites, so
|x_k| <= |delta_k|. Its weight slot in SecAgg+ is 1 for every site (FitRes num_examples = 1
against max_weight 1): Flower then scales nothing, and the server divides the unmasked mean
by nothing it does not know. The server gets mean = sum_k x_k / n over the n sites whose
masked vectors arrived, and forms FedAvg's weighted mean as
sum_k x_k * W / sum_{k ok} w_k, with the weights of the sites that said they trained.

Quantisation (the price of working in integers): each x_k coordinate is clipped to
[-c, c] (``--secagg-clip-range``) and stochastically rounded to 2^b levels
(``--secagg-bits``), one step being 2c / 2^b. A site whose update has a coordinate beyond c
refuses to send it (status failed, with the flag to raise) rather than clip it: clipping
would change the mean unseen. The sum of n sites is exact modulo 2^32 as long as
n 2^b < 2^32 (refused otherwise). So each coordinate of the unmasked sum is off by less
than n steps, and of the weighted mean by less than ``max_error`` (tests hold the run to it).

Privacy: each site's per-patient DP noise and ledger are untouched: a site trains, writes
its release to its ledger, and only then returns the update that the mod masks (the release
is counted before its masked vector leaves). With n sites and threshold t = n // 2 + 1, the
server plus t - 1 colluding sites can unmask one site; a site that drops out after sharing
its keys is unmasked from the others' shares. See docs/flower.md, "Threat model".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as FlowerStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from dpseg.federated.strategies import Weights

__all__ = [
    "SecureRound",
    "fitins_weights",
    "is_fitins",
    "max_error",
    "pack_fitres",
    "secagg_when_asked",
    "secure_round",
    "threshold",
    "weighted_mean",
    "weighted_update",
]

MODULUS = 2**32  # SecAgg+'s masks and sums live modulo this


def threshold(n: int) -> int:
    """Shares needed to unmask: a majority of the round's n sites (2 of 3)."""
    return n // 2 + 1


def step_size(clip_range: float, bits: int) -> float:
    """One quantisation step of SecAgg+ in the update's units."""
    return 2 * clip_range / 2**bits


def max_error(n: int, clip_range: float, bits: int, max_weight: float, weight_sum: float) -> float:
    """The most by which a coordinate of SecAgg+'s weighted mean can differ from the exact
    one, before float32 rounding: each of the n summed vectors is off by less than one
    step after stochastic rounding (float64 arithmetic: no other error of that size), and
    the sum is scaled by W / sum_{k ok} w_k into the mean."""
    return n * step_size(clip_range, bits) * max_weight / weight_sum


# --- client ----------------------------------------------------------------------------------
def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """A mod: SecAgg+'s stages go through Flower's ``secaggplus_mod``, everything else (the
    plain TRAIN of a run without --secagg, QUERY, EVALUATE) straight to the app."""
    if msg.metadata.message_type == MessageType.TRAIN and (
        RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_fitins(content: RecordDict) -> bool:
    return "fitins.parameters" in content.array_records


def fitins_weights(content: RecordDict, template: Weights) -> tuple[Weights, dict]:
    """(global weights, the round's config) from SecAgg+'s FitIns, whose Parameters come in
    the order of ``template``'s keys (the model's: the server builds the same model)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(template):
        raise ValueError(f"FitIns holds {len(arrays)} arrays, the model has {len(template)}")
    weights = {}
    for (k, ref), a in zip(template.items(), arrays, strict=True):
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"FitIns array for {k} is {a.shape}, the model's {tuple(ref.shape)}")
        weights[k] = torch.from_numpy(np.ascontiguousarray(a)).to(ref.dtype)
    return weights, dict(fitins.config)


def weighted_update(delta: Weights | None, template: Weights, scale: float) -> list[np.ndarray]:
    """x_k = scale * delta_k in float64 (zeros when the site sends nothing), in key order.
    float64: the mod quantises in the input's precision, and float32 would round x + c to
    a quarter of a step at 2^22 levels."""
    if delta is None:
        return [np.zeros(tuple(ref.shape), np.float64) for ref in template.values()]
    return [delta[k].double().numpy() * scale for k in template]


def pack_fitres(x: list[np.ndarray], metrics: dict) -> RecordDict:
    """The TRAIN reply in FitRes form, as the mod expects it: the arrays it masks (and then
    removes) and the cleartext metrics (declared: status and steps, plus what
    --share-site-stats allows). num_examples is every site's weight slot, 1 (module doc)."""
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(x), 1, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


# --- server ----------------------------------------------------------------------------------
class _SumCatcher(FlowerStrategy):
    """The legacy Strategy the workflow asks for: it hands out the FitIns prepared for the
    round and keeps the unmasked mean (every result's Parameters are that one mean)."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]):
        self.instructions = instructions
        self.mean: list[np.ndarray] | None = None
        self.results: dict[int, dict] = {}  # node id -> its cleartext metrics
        self.failures = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.failures = len(failures)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.results = {int(proxy.node_id): dict(res.metrics) for proxy, res in results}
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class SecureRound:
    """What the server learns from one SecAgg+ round."""

    total: Weights | None = None  # sum_k x_k over the n sites whose masked vectors arrived
    n: int = 0
    results: dict[str, dict] = field(default_factory=dict)  # site -> cleartext metrics
    seconds: float = 0.0
    halted: str | None = None  # why the protocol stopped before unmasking


def secure_round(
    grid: Grid,
    context: Context,
    r: int,
    weights: Weights,
    configs: dict[str, dict],
    nodes: dict[str, int],
    *,
    clip_range: float,
    bits: int,
    timeout: float,
) -> SecureRound:
    """Runs SecAgg+ over the sites in ``configs`` (site -> its FitIns config) reached at
    ``nodes`` (site -> node id); returns the unmasked sum, which no single site's update
    can be told from."""
    start = time.perf_counter()
    params = ndarrays_to_parameters([v.detach().cpu().numpy() for v in weights.values()])
    instructions = [
        (GridClientProxy(nodes[name], grid, grid.run.run_id), FitIns(params, config))
        for name, config in configs.items()
    ]
    catcher = _SumCatcher(instructions)
    state = context.state
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: r})
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        Parameters(tensors=list(params.tensors), tensor_type=params.tensor_type), True
    )
    n = len(configs)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every site shares its keys with every other (a full graph)
        reconstruction_threshold=threshold(n),
        max_weight=1.0,
        clipping_range=float(clip_range),
        quantization_range=2**bits,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    workflow(grid, LegacyContext(context, strategy=catcher))
    out = SecureRound(seconds=time.perf_counter() - start)
    by_node = {node: name for name, node in nodes.items()}
    out.results = {by_node[node]: m for node, m in catcher.results.items() if node in by_node}
    if catcher.mean is None:
        out.halted = (
            f"secure aggregation stopped before unmasking: fewer than {threshold(n)} of the "
            f"{n} sites answered a stage"
        )
        return out
    out.n = len(catcher.results)
    # The mean Flower computed is sum / n (each weight slot 1); the sum is what n honest
    # sites bound, so the checks hold it, not the mean.
    out.total = {
        k: torch.from_numpy(np.asarray(a, np.float64) * out.n)
        for k, a in zip(weights, catcher.mean, strict=True)
    }
    return out


def weighted_mean(
    total: Weights, max_weight: float, weight_sum: float, template: Weights
) -> Weights:
    """FedAvg's weighted mean from the sum of x_k = (w_k / W) delta_k, in the model's dtypes."""
    scale = max_weight / weight_sum
    return {k: (total[k] * scale).to(template[k].dtype) for k in template}
