"""The label histograms' sum by Flower's SecAgg+ workflow: the server sees no silo's own.

Flower's `SecAggPlusWorkflow` is written for the legacy strategy API: it runs as the fit step of
Flower's `DefaultWorkflow`, asks a legacy `Strategy` which nodes to sample (`configure_fit`) and
hands it the unmasked aggregate (`aggregate_fit`). `secure_histogram_sum` gives it the smallest
such strategy over the nodes it names and a `LegacyContext` for one round, then runs the
workflow on the grid it is given; the silos answer through `fgl_client.secure_histogram`.
Nothing of the protocol is ours (its log lines "[INIT]", "[ROUND 1]" and "[SUMMARY]" are the
secure sum's, not a training round's).

The workflow computes a weighted mean; every honest silo weighs 1 and the quantizer maps
integers to exact steps (clip 2^20, 2^22 levels, modulus 2^32), so the mean times the number of
silos that finished is the exact integer sum. Dropouts are Flower's: a silo that leaves after
sharing its keys is unmasked by the others' shares (at least `threshold` of them must stay).

A lying silo can add anything to the sum, so the server checks what it can see: each masked
vector's form as it arrives (`ShareCheck`, which turns a malformed one into its silo's dropout),
then whether the sum is one that honest silos could have made (`sum_problem`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import FitIns, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fgl_core.payload import REJECTED, SECAGG_RECORD, SECURE_HISTOGRAM_MAX_COUNT

QUANTIZATION_RANGE = 2**22  # 2 levels per count: an integer count is quantized exactly
MODULUS_RANGE = 2**32  # the unmasked sum of up to 1,023 silos fits


@dataclass
class SecureSum:
    """What the workflow unmasked: the sum and which nodes it covers, or why there is none."""

    histogram: list[int] | None = None
    nodes: list[int] = field(default_factory=list)
    failures: int = 0
    rejected: dict[int, str] = field(default_factory=dict)  # node -> why its share was refused
    problem: str = ""  # why no sum came (the workflow halted or the sum does not add up)
    mean: np.ndarray | None = None  # what the workflow handed the strategy (its weighted mean)


# Flower's names for the SecAgg+ stage that collects the masked vectors and for their key
# (flwr.common.secure_aggregation.secaggplus_constants: not part of Flower's documented API)
COLLECT_STAGE, MASKED_KEY, STAGE_KEY = "collect_masked_vectors", "masked_params", "stage"


class ShareCheck(Grid):
    """The grid the workflow runs on: the grid it is given, with each masked vector checked as
    it arrives. A silo's masked vector is its histogram plus masks, so no value in it says
    anything, but its form is fixed: two integer arrays (the weight, then `num_classes`
    counts), every value in [0, modulus). A reply of any other form becomes an error reply
    naming the node, which the workflow then treats as a dropout: the others' key shares
    remove its masks and the sum covers the rest."""

    def __init__(self, grid: Grid, num_classes: int, modulus: int, result: SecureSum):
        self.grid, self.num_classes, self.modulus, self.result = grid, num_classes, modulus, result

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        return [self._checked(reply, sent) for reply in replies]

    def _checked(self, reply: Message, sent: dict[int, Message]) -> Message:
        node = reply.metadata.src_node_id
        request = sent.get(node)
        if reply.has_error() or request is None:
            return reply
        stage = request.content.config_records.get(SECAGG_RECORD, {}).get(STAGE_KEY)
        if stage != COLLECT_STAGE:
            return reply
        problem = self._masked_vector_problem(reply)
        if problem is None:
            return reply
        reason = f"rejected by the server: node {node}: its SecAgg+ masked vector {problem}"
        log(WARNING, "%s; the secure sum goes on without it", reason)
        self.result.rejected[node] = reason
        return Message(Error(code=REJECTED, reason=reason), reply_to=request)

    def _masked_vector_problem(self, reply: Message) -> str | None:
        record = reply.content.config_records.get(SECAGG_RECORD)
        vectors = None if record is None else record.get(MASKED_KEY)
        if not isinstance(vectors, list) or len(vectors) != 2:
            return "should be a list of 2 arrays (weight, counts)"
        expected = [(1,), (self.num_classes,)]
        for part, (data, shape) in enumerate(zip(vectors, expected, strict=True)):
            try:
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as err:  # bytes of any kind: whatever np.load makes of them
                return f"part {part} is not an array ({type(err).__name__}: {err})"
            if array.shape != shape or array.dtype.kind not in "iu":
                return f"part {part} is {array.dtype}{list(array.shape)}; expected int{list(shape)}"
            if array.size and not (int(array.min()) >= 0 and int(array.max()) < self.modulus):
                return f"part {part} holds values outside [0, {self.modulus})"
        return None

    # the rest of the Grid: the grid's own

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


class _SumOfNodes(Strategy):
    """The legacy strategy the workflow needs: sample the given nodes, keep the aggregate."""

    def __init__(self, nodes: list[int], result: SecureSum):
        self.nodes, self.result = nodes, result

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        ins = FitIns(parameters, {})  # the silo's mod knows what to send
        connected = client_manager.all()  # the workflow's proxies, by str(node id)
        return [(connected[str(n)], ins) for n in self.nodes if str(n) in connected]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        (self.result.mean,) = parameters_to_ndarrays(results[0][1].parameters)
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
    grid: Grid,
    nodes: list[int],
    num_classes: int,
    timeout: float | None,
    num_train: dict[int, int],
) -> SecureSum:
    """Run SecAgg+ over `nodes` (at least 2); the sum of their label histograms.

    A silo can put anything into a secure sum, so the server checks what it can: each masked
    vector's form as it arrives (`ShareCheck`: a silo whose vector is malformed is dropped,
    named, and the sum covers the others), then the sum itself: `num_classes` finite,
    non-negative integers adding up to the training images that the nodes it covers said they
    hold (`num_train`, from their payloads). A silo that inflates its weight, adds a negative
    count or sends a vector of zeros with a weight of its own choosing fails the last check.
    Never raises for what silos sent: a sum that cannot be used comes back with `histogram`
    None and `problem` saying why.
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
    checked = ShareCheck(grid, num_classes, MODULUS_RANGE, result)
    try:
        DefaultWorkflow(fit_workflow=secagg)(checked, context)
    except Exception as err:  # what silos sent made Flower's unmasking fail
        result.problem = f"SecAgg+ failed while unmasking ({type(err).__name__}: {err})"
        return result
    if result.mean is None:
        result.problem = (
            f"SecAgg+ over nodes {nodes} halted before the sum was unmasked (too few silos "
            "stayed); see the log above"
        )
        return result
    result.problem = sum_problem(
        result.mean * len(result.nodes), num_classes, result.nodes, num_train
    )
    if not result.problem:
        result.histogram = [int(c) for c in np.rint(result.mean * len(result.nodes))]
    return result


def sum_problem(
    total: np.ndarray, num_classes: int, nodes: list[int], num_train: dict[int, int]
) -> str:
    """Why `total` (the unmasked sum over `nodes`) is not their label histograms' sum, or ""."""
    said = sum(num_train.get(n, 0) for n in nodes)
    counts = np.asarray(total, np.float64).ravel()
    if counts.shape != (num_classes,) or not np.isfinite(counts).all():
        return f"the secure sum is {counts.tolist()}: not {num_classes} finite counts"
    rounded = np.rint(counts)
    # an honest sum is exact (weight 1 each, integer counts on exact quantization steps);
    # floating point leaves far less than this
    if np.abs(counts - rounded).max() > 1e-3:
        return (
            f"the secure sum {np.round(counts, 3).tolist()} is not a sum of counts: a silo sent "
            "a weight other than 1"
        )
    if rounded.min() < 0 or int(rounded.sum()) != said:
        return (
            f"the secure sum {[int(c) for c in rounded]} counts {int(rounded.sum())} images; the "
            f"nodes it covers ({nodes}) said they hold {said}: at least one silo sent a "
            "histogram that is not its own"
        )
    return ""
