"""Privacy boundary: every message a site sends during a run (train and evaluate replies of a
round, two sites configured as deployed SuperNodes are: node config ``site`` + ``data``) holds
only the model's arrays and scalar metrics, plus the site's name. No signal values, record
ids, patient ids or file paths leave the site.

The ClientApp's functions run in this process behind a grid that records each reply exactly as
the ServerApp receives it (the same ``RecordDict`` a SuperNode would push)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import Message

from shared.federation.site_training import new_model
from deploy_harness import make_caches
from flower_shim import deliver, make_context, server_task_identity
from shared.federation.run_config import load_run_config
from server.loop import run_server

SITES = ("ptb", "ptbxl")
ALLOWED_CONFIG = {"site": {"site", "skipped-reason"}, "node": {"sites"}}


class RecordingGrid:
    """Nodes 201, 202 ... are deployed sites (node config site + data); replies are recorded."""

    def __init__(self, run_config, caches):
        self.contexts = {
            201 + i: make_context({"site": site, "data": str(caches[site])}, run_config, 201 + i)
            for i, site in enumerate(SITES)
        }
        self.sent_by_site: dict[str, list[Message]] = {s: [] for s in SITES}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = deliver(msg, self.contexts[node])
            self.sent_by_site[self.contexts[node].node_config["site"]].append(reply)
            replies.append(reply)
        return replies


def private_strings(cache) -> set[str]:
    """What must never leave: record ids, patient ids, the cache's own path."""
    with open(cache / "records.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    values = {r["record_id"] for r in rows} | {r["patient_id"] for r in rows}
    return {v for v in values if v} | {str(cache), str(cache.resolve())}


def test_sites_send_only_model_arrays_and_scalar_metrics(tmp_path_factory, tmp_path):
    caches = make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", SITES, records=12)
    run_config = {"model": "hierarchical", "preset": "tiny", "batch-size": 16, "device": "cpu",
                  "sites": ",".join(SITES), "num-server-rounds": 1, "server-eval": "off",
                  "out-dir": str(tmp_path / "run")}
    cfg = load_run_config(run_config)
    grid = RecordingGrid(run_config, caches)
    with server_task_identity():
        run_server(grid, cfg, echo=lambda line: None)

    model_shapes = {k: tuple(v.shape) for k, v in new_model(cfg).state_dict().items()}
    for site in SITES:
        replies = grid.sent_by_site[site]
        kinds = [r.metadata.message_type for r in replies]
        assert kinds.count("train") == 1 and kinds.count("evaluate") == 1 and kinds.count("query") == 1, kinds
        forbidden = private_strings(caches[site])
        for reply in replies:
            assert not reply.has_error()
            content = reply.content
            # arrays: only in a train reply, and exactly the model's parameters and buffers
            if reply.metadata.message_type == "train":
                assert list(content.array_records) == ["arrays"]
                arrays = content.array_records["arrays"]
                assert {k: tuple(a.shape) for k, a in arrays.items()} == model_shapes
            else:
                assert not content.array_records
            # metrics: numbers (or a list of numbers: per-class AUROC), nothing else; the answer
            # to the server's query (which site this node plays) carries no metrics at all
            assert list(content.metric_records) == ([] if reply.metadata.message_type == "query" else ["metrics"])
            for key, value in (content.metric_records["metrics"].items() if content.metric_records else []):
                values = value if isinstance(value, list) else [value]
                assert all(isinstance(v, (int, float)) for v in values), (key, value)
                assert len(values) <= 16, f"{key}: {len(values)} values is not a scalar metric"
            # config: the site's own name (and why it skipped a round), nothing else
            for name, record in content.config_records.items():
                assert name in ALLOWED_CONFIG and set(record) <= ALLOWED_CONFIG[name], (name, dict(record))
                for value in record.values():
                    assert isinstance(value, str) and "/" not in value
                    assert value in ("", site) or value.startswith("epsilon"), value
                    assert not any(secret in value for secret in forbidden)


def test_recording_grid_would_catch_a_leak(tmp_path_factory, tmp_path):
    """The checks above can fail: a reply carrying a record id and a signal array is caught."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    caches = make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", SITES, records=12)
    forbidden = private_strings(caches["ptb"])
    leaky = RecordDict({
        "arrays": ArrayRecord({"x": Array(np.zeros((12, 2500), dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": 3}),
        "site": ConfigRecord({"site": "ptb", "record": sorted(forbidden)[0]}),
    })
    assert set(leaky.config_records["site"]) - ALLOWED_CONFIG["site"] == {"record"}
    assert any(s in str(leaky.config_records["site"]["record"]) for s in forbidden)
    cfg = load_run_config({"model": "hierarchical", "preset": "tiny"})
    shapes = {k: tuple(v.shape) for k, v in new_model(cfg).state_dict().items()}
    assert {k: tuple(a.shape) for k, a in leaky.array_records["arrays"].items()} != shapes


# ------------------------------------------------------------------ real processes: the site's ledger
def _epsilon(rounds_csv, rnd: int, site: str) -> float:
    with open(rounds_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] == str(rnd) and r["site"] == site]
    metrics = {r["metric"]: float(r["value"]) for r in rows}
    assert "train_loss" not in metrics, metrics  # no unnoised loss left the DP site
    assert metrics.get("dp_units_record", 0) > 0 and metrics.get("dp_sample_rate", 0) > 0, metrics
    return metrics["epsilon"]


@pytest.mark.slow
def test_epsilon_continues_across_resume_and_node_restart(tmp_path_factory, tmp_path):
    """One deployment (`python -m server`, `python -m client --state-dir`), two runs: round 1;
    the site's node restarted and the run resumed for round 2: epsilon continues from the site's
    ledger. (A site refusing on its policy: tests/test_client_app.py, at the ClientApp.)"""
    from deploy_harness import REPO_ROOT, Federation, Processes, flwr_env, run_log, submit_run, wait_run

    caches = make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", SITES, records=12)
    app = REPO_ROOT / "simulations" / "four_sites"
    state = tmp_path / "ptb-state"
    processes = Processes(log_dir=tmp_path, env=flwr_env(tmp_path / "flwr-home"))
    fed = Federation(processes, state_dir=tmp_path / "superlink", certs=None)
    out = tmp_path / "run"

    def run(rounds: int, *, resume: bool, out_dir=out) -> tuple[dict, str]:
        config = (f'num-server-rounds={rounds} preset="tiny" model="hierarchical" sites="ptb" dp=true '
                  f'dp-batch-size=16 local-epochs=1 dp-local-epochs=1 server-eval="off" node-wait-timeout=60.0 '
                  f'round-timeout=120.0 device="cpu" out-dir="{out_dir}" resume={str(resume).lower()}')
        run_id = submit_run(processes.env, app, fed.connection, config)
        status = wait_run(processes.env, fed.connection, run_id, timeout=300)
        return status, run_log(processes.env, fed.connection, run_id)

    try:
        fed.start_server(tls=False)
        node = fed.start_site("ptb", caches["ptb"], tls=False, extra=("--state-dir", str(state)))
        fed.wait_online(1, timeout=90)
        status, log = run(1, resume=False)
        assert status["status"] == "finished:completed", (status, log)
        eps1 = _epsilon(out / "rounds.csv", 1, "ptb")

        processes.stop(node)  # the hospital restarts its node: its ledger is on its disk
        node = fed.start_site("ptb", caches["ptb"], tls=False, extra=("--state-dir", str(state)),
                              name="site-ptb-restarted")
        fed.wait_online(1, timeout=90)
        status, log = run(2, resume=True)
        assert status["status"] == "finished:completed", (status, log)
        eps2 = _epsilon(out / "rounds.csv", 2, "ptb")
        assert eps2 > eps1 > 0
        (ledger,) = state.glob("privacy-ledger-*.json")
        import json

        assert [r["round"] for r in json.loads(ledger.read_text())["rounds"]] == [1, 2]
    finally:
        processes.stop_all()
