"""Which node plays which site (``server.assignment``), through the real server loop and the real
ClientApp functions behind an in-process grid (no Ray): simulated nodes share the sites, a
deployed node plays only its own, and what cannot be served fails before anyone trains."""

from __future__ import annotations

import copy
import csv

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # what grid.get_nodes() returns in a deployment

from flower_shim import InProcessGrid, deliver, server_task_identity
from server.assignment import SiteAssignment
from server.loop import run_server
from shared.federation.run_config import load_run_config

BASE = {"model": "hierarchical", "preset": "tiny", "synthetic-records": 12, "batch-size": 16,
        "local-epochs": 1, "dp-local-epochs": 1, "device": "cpu", "num-server-rounds": 1, "server-eval": "off"}
SITES = ["ptb", "ptbxl", "mimic", "cinc"]


pytestmark = pytest.mark.usefixtures("synthetic_cache_root")  # caches outside ~/.cache


def _serve(run_config, grid, lines=None):
    with server_task_identity():
        return run_server(grid, load_run_config(run_config), echo=(lines.append if lines is not None else print))


def _trained_sites(outcome, rnd=1) -> set[str]:
    return {site for r, site, metric, value in outcome.log.rows
            if r == rnd and metric == "num_examples" and value > 0}


def test_two_simulated_nodes_serve_four_sites_each_message_naming_its_site(tmp_path):
    run = {**BASE, "out-dir": str(tmp_path / "run")}
    grid = InProcessGrid(run, n_nodes=2)
    lines = []
    outcome = _serve(run, grid, lines)
    assert _trained_sites(outcome) == set(SITES)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(m.content["config"]["site"] for m in train) == sorted(SITES)
    assert {m.metadata.dst_node_id for m in train} == {101, 102}  # both nodes work, two sites each
    assert any(line.startswith("sites by node: node 101: ptb,mimic; node 102: ptbxl,cinc") for line in lines), lines


def test_deployed_nodes_play_their_own_sites_and_a_duplicate_is_left_out(tmp_path):
    run = {**BASE, "sites": "ptb,mimic", "out-dir": str(tmp_path / "run")}
    nodes = [{"site": "mimic"}, {"site": "ptb"}, {"site": "ptb"}, {"site": "cinc"}]
    grid = InProcessGrid(run, node_configs=nodes)
    lines = []
    outcome = _serve(run, grid, lines)
    assert _trained_sites(outcome) == {"ptb", "mimic"}
    sent = {(m.metadata.dst_node_id, m.content["config"]["site"]) for m in grid.sent
            if m.metadata.message_type == "train"}
    assert sent == {(201, "mimic"), (202, "ptb")}
    assert "node 203 also claims site 'ptb' (node 202 plays it): it is left out" in lines
    assert any(line.startswith("node 204 plays site 'cinc', which is not in this run's sites") for line in lines)


class FibbingGrid(InProcessGrid):
    """Node 201 is bound to mimic but answers the server's query with '*' (any site)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for i, msg in enumerate(messages):
            if msg.metadata.message_type == "query" and msg.metadata.dst_node_id == 201:
                replies[i] = Message(RecordDict({"node": ConfigRecord({"sites": "*"})}), reply_to=msg)
        return replies


def test_a_node_refusing_a_site_it_is_not_bound_to_is_reported_by_the_server(tmp_path):
    run = {**BASE, "sites": "ptb,mimic", "min-replies": 1, "out-dir": str(tmp_path / "run")}
    grid = FibbingGrid(run, node_configs=[{"site": "mimic"}])
    outcome = _serve(run, grid, [])
    assert _trained_sites(outcome) == {"mimic"}
    with open(tmp_path / "run" / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["site"], r["node_id"]) for r in rows] == [("1", "ptb", "201")]
    assert "refused: this node is bound to site 'mimic' and refuses a message for site 'ptb'" in rows[0]["reason"]


def test_a_site_without_a_node_fails_before_any_node_trains(tmp_path):
    run = {**BASE, "node-wait-timeout": 0.5, "out-dir": str(tmp_path / "run")}
    grid = InProcessGrid(run, node_configs=[{"site": s} for s in ("ptb", "ptbxl", "mimic")])
    with pytest.raises(RuntimeError, match=r"no node plays site\(s\) \['cinc'\]"):
        _serve(run, grid, [])
    assert {m.metadata.message_type for m in grid.sent} == {"query"}


class QueryGrid:
    """Nodes that answer the server's query as ``answers`` says (a missing node never answers);
    ``names``: the name each node's key was registered under (Flower's ``NodeInfo.name``)."""

    def __init__(self, answers: dict[int, str], nodes: list[int] | None = None,
                 names: dict[int, str] | None = None):
        self.answers, self.nodes, self.asked = answers, nodes or list(answers), []
        self.names = names or {}

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.nodes]

    def send_and_receive(self, messages, *, timeout=None):
        self.asked.append(sorted(m.metadata.dst_node_id for m in messages))
        return [Message(RecordDict({"node": ConfigRecord({"sites": self.answers[m.metadata.dst_node_id]})}),
                        reply_to=m) for m in messages if m.metadata.dst_node_id in self.answers]


def test_sites_stay_with_their_nodes_and_only_an_orphaned_site_moves():
    assignment = SiteAssignment(SITES, echo=lambda line: None)
    grid = QueryGrid({1: "*", 2: "*", 3: "*"})
    with server_task_identity():
        assignment.refresh(grid)
        assert assignment.node_of_site == {"ptb": 1, "ptbxl": 2, "mimic": 3, "cinc": 1}
        grid.nodes = [1, 3]
        assignment.refresh(grid)
        assert assignment.node_of_site == {"ptb": 1, "ptbxl": 3, "mimic": 3, "cinc": 1}
        grid.nodes = [3]
        assignment.refresh(grid)
        assert assignment.node_of_site == {s: 3 for s in SITES}


def test_the_node_playing_a_site_keeps_it_against_a_newcomer_claiming_it():
    lines = []
    assignment = SiteAssignment(["ptb", "mimic"], echo=lines.append)
    grid = QueryGrid({900: "ptb", 901: "mimic"})
    with server_task_identity():
        assignment.refresh(grid)
        grid.answers[5] = "ptb"
        grid.nodes = [900, 901, 5]
        assignment.refresh(grid)
    assert assignment.node_of_site == {"ptb": 900, "mimic": 901}
    assert [line for line in lines if "no registered name" not in line] == [
        "node 5 also claims site 'ptb' (node 900 plays it): it is left out"]
    # without registered names, each node's site is its own claim, and the server says so once
    assert sum("node 900 has no registered name: its site 'ptb' is its own claim" in line for line in lines) == 1


def test_with_node_authentication_the_registered_name_decides_the_site():
    """Keys registered under site names (`flwr supernode register KEY.pub --name SITE`): a node
    plays the site it is registered as; a second key for a site, a node answering another site
    than its registration, and a site outside the run are refused and reported."""
    lines = []
    assignment = SiteAssignment(["ptb", "mimic"], echo=lines.append)
    answers = {900: "ptb", 901: "mimic", 902: "ptb", 903: "ptb", 904: "cinc"}
    names = {900: "ptb", 901: "mimic", 902: "ptb", 903: "mimic", 904: "cinc"}
    with server_task_identity():
        assignment.refresh(QueryGrid(answers, names=names))
    assert assignment.node_of_site == {"ptb": 900, "mimic": 901}
    assert sorted(lines) == sorted([
        "node 902 also claims site 'ptb' (node 900 plays it): it is left out",
        "node 903 is registered as site 'mimic' but answers 'ptb': it is left out",
        "node 904 plays site 'cinc', which is not in this run's sites ['ptb', 'mimic']: it is left out",
    ])


def test_a_node_that_does_not_answer_is_not_asked_again_every_round():
    assignment = SiteAssignment(["ptb", "mimic"], echo=lambda line: None)
    grid = QueryGrid({1: "*"}, nodes=[1, 2])
    with server_task_identity():
        for _ in range(3):
            assignment.refresh(grid)
    assert grid.asked == [[1, 2]]
    assert assignment.node_of_site == {"ptb": 1, "mimic": 1}


class RacingGrid(InProcessGrid):
    """Flower's simulation engine: the messages of one call run at once, each on a copy of its
    node's Context, and the node keeps whichever copy comes back last."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += messages
        returned, replies = {}, []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = copy.deepcopy(self.contexts[node])
            replies.append(deliver(msg, context))
            returned[node] = context  # the last one wins
        self.contexts.update(returned)
        return replies


def test_a_node_playing_two_sites_keeps_both_sites_state_across_rounds(tmp_path):
    """DP accountants of the two sites of each node survive: epsilon grows at every site."""
    run = {**BASE, "dp": True, "num-server-rounds": 2, "out-dir": str(tmp_path / "run")}
    outcome = _serve(run, RacingGrid(run, n_nodes=2), [])
    for site in SITES:
        eps1, eps2 = outcome.log.value(1, site, "epsilon"), outcome.log.value(2, site, "epsilon")
        assert eps2 > eps1 > 0, (site, eps1, eps2)


class LeavingGrid(InProcessGrid):
    """The ptb node (202) leaves after round 1 and comes back as a new node (203) for round 3."""

    def __init__(self, run_config, caches):
        super().__init__(run_config, node_configs=[{"site": "mimic", "data": str(caches["mimic"])},
                                                   {"site": "ptb", "data": str(caches["ptb"])}])
        self.trains = 0
        self.away = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == "train" for m in messages):
            self.trains += 1
            if self.trains == 1:
                self.away[203] = self.contexts.pop(202)
            elif self.trains == 2:
                self.contexts.update(self.away)
        return replies


def test_a_site_whose_node_left_is_recorded_per_round_and_rejoins_with_a_new_node(tmp_path):
    from shared.federation.site_data import ensure_cache

    run = {**BASE, "sites": "ptb,mimic", "num-server-rounds": 3, "fraction-evaluate": 0.0,
           "min-replies": 1, "out-dir": str(tmp_path / "run")}
    cfg = load_run_config(run)
    grid = LeavingGrid(run, {s: ensure_cache(s, "", cfg) for s in ("ptb", "mimic")})
    outcome = _serve(run, grid, [])
    assert [_trained_sites(outcome, r) for r in (1, 2, 3)] == [{"ptb", "mimic"}, {"mimic"}, {"ptb", "mimic"}]
    with open(tmp_path / "run" / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["site"], r["reason"]) for r in rows] == [("2", "ptb", "no node plays this site")]


def test_a_round_waits_for_its_floor_of_sites_until_the_deadline_then_ends_the_run():
    """Flower's sample_nodes would wait forever for min_available_nodes; the strategy samples
    among the sites that have a node and waits at most node-wait-timeout for min-replies of them."""
    import time

    from server.guard import RoundFailed
    from server.strategies import build_strategy
    from flwr.app import ArrayRecord, ConfigRecord

    cfg = load_run_config({**BASE, "sites": "ptb,ptbxl,mimic", "node-wait-timeout": 1.0})
    strategy = build_strategy(cfg)
    assert strategy.min_replies == 2  # default: a majority of the three sites
    strategy.assignment = SiteAssignment(cfg.site_list, echo=lambda line: None)
    grid = QueryGrid({900: "ptb"}, names={900: "ptb"})
    started = time.monotonic()
    with server_task_identity(), pytest.raises(RoundFailed, match=(
            r"round 4: no node for \['ptbxl', 'mimic'\] within node-wait-timeout = 1 s; only \['ptb'\] of "
            r"\['ptb', 'ptbxl', 'mimic'\] have a node, the round needs min-replies = 2. The run ends here")):
        strategy.configure_evaluate(4, ArrayRecord(), ConfigRecord(), grid)
    assert time.monotonic() - started < 10
    grid.answers[901], grid.names[901] = "mimic", "mimic"
    grid.nodes = [900, 901]
    with server_task_identity():
        sent = list(strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.content["config"]["site"] for m in sent) == ["mimic", "ptb"]
    assert all(m.content["config"]["fed-ecg-version"] for m in sent)  # the version handshake travels
