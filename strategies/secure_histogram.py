"""The label histograms' sum by Flower's SecAgg+ workflow: the server sees no silo's own.

Flower's `SecAggPlusWorkflow` is written for the legacy strategy API: it runs as the fit step of
Flower's `DefaultWorkflow`, asks a legacy `Strategy` which nodes to sample (`configure_fit`) and
hands it the unmasked aggregate (`aggregate_fit`). `secure_histogram_sum` gives it the smallest
such strategy over the nodes it names and a `LegacyContext` for one round, then runs the
workflow on the grid it is given; the silos answer through `fgl_client.secure_histogram`.
Nothing of the protocol is ours (its log lines "[INIT]", "[ROUND 1]" and "[SUMMARY]" are the
secure sum's, not a training round's).

The workflow computes a weighted mean; every silo weighs 1 and the quantizer maps integers to
exact steps (clip 2^20, 2^22 levels, modulus 2^32), so the mean times the number of silos that
finished is the exact integer sum. Dropouts are Flower's: a silo that leaves after sharing its
keys is unmasked by the others' shares (at least `threshold` of them must stay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Context, RecordDict
from flwr.common import FitIns, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fgl_core.payload import SECURE_HISTOGRAM_MAX_COUNT

QUANTIZATION_RANGE = 2**22  # 2 levels per count: an integer count is quantized exactly
MODULUS_RANGE = 2**32  # the unmasked sum of up to 1,023 silos fits


@dataclass
class SecureSum:
    """What the workflow unmasked: the sum, and which nodes it covers."""

    histogram: list[int] | None = None
    nodes: list[int] = field(default_factory=list)
    failures: int = 0


class _SumOfNodes(Strategy):
    """The legacy strategy the workflow needs: sample the given nodes, keep the aggregate."""

    def __init__(self, nodes: list[int], result: SecureSum):
        self.nodes, self.result = nodes, result

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        ins = FitIns(parameters, {})  # the silo's mod knows what to send
        connected = client_manager.all()  # the workflow's proxies, by str(node id)
        return [(connected[str(n)], ins) for n in self.nodes if str(n) in connected]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        (mean,) = parameters_to_ndarrays(results[0][1].parameters)
        total = np.rint(mean * len(results))
        self.result.histogram = [int(c) for c in total]
        self.result.nodes = sorted(proxy.node_id for proxy, _ in results)
        self.result.failures = len(failures)
        return None, {}

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return ndarrays_to_parameters([])  # none: no silo is asked for a model

    # the rest of the legacy interface: one round with nothing to evaluate

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


def secure_histogram_sum(
    grid: Grid, nodes: list[int], num_classes: int, timeout: float | None
) -> SecureSum:
    """Run SecAgg+ over `nodes` (at least 2); the sum of their label histograms.

    Raises `RuntimeError` if the workflow halts (too few nodes stayed to unmask) or the sum is
    not a histogram of `num_classes` non-negative counts (a silo can add anything to a secure
    sum, so this is the one check left to the server).
    """
    if len(nodes) < 2:
        raise RuntimeError(f"a secure sum needs at least 2 silos; {len(nodes)} sent payloads")
    result = SecureSum()
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=_SumOfNodes(nodes, result),
        client_manager=SimpleClientManager(),
    )
    secagg = SecAggPlusWorkflow(
        num_shares=1.0,  # every silo shares its keys with all others
        reconstruction_threshold=0.5,
        max_weight=1.0,
        clipping_range=float(SECURE_HISTOGRAM_MAX_COUNT),
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    log(INFO, "secure histograms: one round of Flower's SecAgg+ workflow over %d silos", len(nodes))
    DefaultWorkflow(fit_workflow=secagg)(grid, context)
    if result.histogram is None:
        raise RuntimeError(
            f"SecAgg+ over nodes {nodes} halted before the sum was unmasked (too few silos "
            "stayed); see the log above"
        )
    if len(result.histogram) != num_classes or min(result.histogram) < 0:
        raise RuntimeError(
            f"the secure sum of the label histograms is {result.histogram}: not "
            f"{num_classes} non-negative counts, so at least one silo sent a bad histogram"
        )
    return result
