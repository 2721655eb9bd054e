"""server.guard: a site's reply with NaN/inf weights, arrays of the wrong shape or name, a bad
`num-examples`, an error, or no reply at all is kept out of Flower's aggregation and recorded
(round, site, node, time, reason); the aggregate of the remaining sites stays finite, and a
round where nobody is usable leaves the previous global model in place."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flower_shim import make_message, server_task_identity
from server.guard import FAILURE_COLUMNS, ReplyGuard, RoundFailed, check_arrays

NODES = {11: "ptb", 12: "ptbxl", 13: "mimic", 14: "cinc", 15: "ptb"}


def global_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return ArrayRecord(model.state_dict())


def sent_messages(arrays: ArrayRecord, nodes) -> list[Message]:
    return [make_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                         "train", dst_node_id=n) for n in nodes]


def reply(to: Message, site: str, arrays: dict[str, np.ndarray], num_examples=10) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5}),
        "site": ConfigRecord({"site": site, "skipped-reason": ""}),
    })
    return Message(content, reply_to=to)


def superlink_error(to: Message, reason: str) -> Message:
    """An error the SuperLink creates for a node that stopped heartbeating: it comes from the
    SuperLink (node id 1), not from the node, and answers the message the node never did."""
    error = Message(Error(code=5, reason=reason), reply_to=to)
    error.metadata.__dict__["_src_node_id"] = 1  # as stamped by the SuperLink
    return error


def numpy_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in arrays.items()}


def test_check_arrays_names_the_problem():
    ref = global_arrays()
    good = numpy_of(ref)
    assert check_arrays(ArrayRecord({k: Array(v) for k, v in good.items()}), ref) is None
    nan = dict(good, **{"0.weight": np.full((3, 4), np.nan, dtype=np.float32)})
    assert "NaN/inf" in check_arrays(ArrayRecord({k: Array(v) for k, v in nan.items()}), ref)
    shape = dict(good, **{"1.bias": np.zeros(5, dtype=np.float32)})
    assert "shape (5,)" in check_arrays(ArrayRecord({k: Array(v) for k, v in shape.items()}), ref)
    missing = {k: v for k, v in good.items() if k != "1.bias"}
    assert "missing arrays '1.bias'" in check_arrays(
        ArrayRecord({k: Array(v) for k, v in missing.items()}), ref)


def test_bad_replies_are_excluded_and_recorded(tmp_path):
    ref = global_arrays()
    good = numpy_of(ref)
    with server_task_identity():
        guard = ReplyGuard()
        # round 1: every site healthy (the guard learns which node is which site)
        out1 = sent_messages(ref, [11, 12, 13, 14])
        guard.sent(1, ref, out1)
        kept1 = guard.screen(1, [reply(m, NODES[m.metadata.dst_node_id], good) for m in out1])
        assert len(kept1) == 4 and guard.exclusions == []

        # round 2: ptbxl NaN, mimic inf + wrong shape, cinc crashed, node 15 never answered
        out2 = sent_messages(ref, [11, 12, 13, 14, 15])
        guard.sent(2, ref, out2)
        honest = {k: v + 1.0 for k, v in good.items()}
        nan = dict(good, **{"0.weight": np.full((3, 4), np.nan, dtype=np.float32)})
        shaped = dict(good, **{"0.weight": np.full((4, 4), np.inf, dtype=np.float32)})
        replies = [
            reply(out2[0], "ptb", honest),
            reply(out2[1], "ptbxl", nan),
            reply(out2[2], "mimic", shaped),
            superlink_error(out2[3], "Node Unavailable"),
        ]
        kept2 = guard.screen(2, replies)

        assert [m.metadata.src_node_id for m in kept2] == [11]
        reasons = {(e.site, e.node_id): e.reason for e in guard.exclusions}
        assert set(reasons) == {("ptbxl", 12), ("mimic", 13), ("cinc", 14), ("?", 15)}
        assert "NaN/inf" in reasons[("ptbxl", 12)]
        assert "shape (4, 4)" in reasons[("mimic", 13)]
        assert "Node Unavailable" in reasons[("cinc", 14)]
        assert "no reply" in reasons[("?", 15)]
        assert guard.excluded_sites(2) == ["ptbxl", "mimic", "cinc", "?"]

        # the aggregate of what is left is the honest site's weights, finite
        strategy = FedAvg()
        arrays, _ = strategy.aggregate_train(2, kept2)
        for key, value in numpy_of(arrays).items():
            assert np.isfinite(value).all()
            np.testing.assert_allclose(value, honest[key], rtol=1e-6)

        # round 3: nobody usable -> Flower aggregates nothing, the round-2 model stays
        out3 = sent_messages(ref, [12])
        guard.sent(3, ref, out3)
        kept3 = guard.screen(3, [reply(out3[0], "ptbxl", nan, num_examples=float("nan"))])
        assert kept3 == []
        assert strategy.aggregate_train(3, kept3)[0] is None
        assert "num-examples" in guard.exclusions[-1].reason

    guard.write(tmp_path / "failures.csv")
    with open(tmp_path / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == FAILURE_COLUMNS
    assert [(r["round"], r["site"]) for r in rows] == [
        ("2", "ptbxl"), ("2", "mimic"), ("2", "cinc"), ("2", "?"), ("3", "ptbxl")]
    assert all(r["time_utc"].endswith("Z") for r in rows)


@pytest.mark.parametrize("weight", [-1, float("inf"), "ten"])
def test_bad_num_examples_is_excluded(weight):
    ref = global_arrays()
    with server_task_identity():
        guard = ReplyGuard()
        out = sent_messages(ref, [11])
        guard.sent(1, ref, out)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in numpy_of(ref).items()}),
            "metrics": MetricRecord({"num-examples": 1}) if weight == "ten" else
            MetricRecord({"num-examples": weight}),
            "site": ConfigRecord({"site": "ptb"}),
        })
        if weight == "ten":
            content = RecordDict({"arrays": content["arrays"], "site": content["site"],
                                  "config": ConfigRecord({"num-examples": weight})})
        assert guard.screen(1, [Message(content, reply_to=out[0])]) == []
    assert len(guard.exclusions) == 1


def test_a_round_short_of_min_replies_ends_the_run_naming_round_and_sites():
    """The one short-round policy (server.guard.ReplyGuard.require, used before aggregation and
    at the round's end): fewer than min-replies valid replies end the run with RoundFailed."""
    guard = ReplyGuard()
    guard.unserved(3, "mimic")
    guard.require(3, ["ptb", "ptbxl"], min_replies=2)  # enough: nothing happens
    with pytest.raises(RoundFailed, match=r"round 3: 1 valid training reply \(from ptb\), the round needs "
                                          r"min-replies = 2; left out: mimic: no node plays this site .*"
                                          r"checkpoint.pt holds the model of round 2"):
        guard.require(3, ["ptb"], min_replies=2)
