"""The Flower ClientApp: one hospital site. Messages in, ``shared.federation.site_training`` calls, messages out.

Node config (deployment): ``site`` and ``data`` (the site's prepared cache). Simulation: the
node's ``partition-id`` indexes the run config's ``sites`` list and the cache comes from the run
config (``cache-<site>``, '' = the embedded synthetic data, generated on first use).

State kept between rounds in ``context.state`` (each round may run in a fresh process):
``dp-state`` (ConfigRecord: the Opacus accountant history, so epsilon is cumulative) and
``site-local`` (ArrayRecord: the site's own values of the model's site-local parameters, e.g.
BatchNorm statistics kept local as in FedBN; run config ``site-local = false`` turns this off).
``context.state`` lasts one run: after a ``resume`` the site-local values restart from the
global model's.

Train reply: ``arrays`` (the locally trained weights) and ``metrics`` with ``num-examples``,
``train-loss``, ``steps``, ``epsilon``/``delta`` (cumulative; -1 when DP is off) and
``dp-budget-exhausted`` (1 = the site did not train: its next round would exceed the epsilon
budget; it then sends ``num-examples`` 0, which the server leaves out of the aggregate).
A ``site`` ConfigRecord names the site. Evaluate reply: ``num-examples``, ``loss``,
``auroc-macro`` (NaN when undefined), ``auroc-per-class`` and ``synthetic`` (1 = the site's
cache is synthetic data).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.federation.site_data import ensure_cache, is_synthetic_cache, resolve_site
from shared.federation.site_training import evaluate_site, train_site
from shared.federation.run_config import load_run_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    site, setting = resolve_site(context.node_config, cfg)
    cache = ensure_cache(site, setting, cfg)
    config = msg.content["config"]
    server_round = int(config["server-round"])  # absolute, also after a resume
    dp_state = _dp_state(context)
    outcome = train_site(
        cfg, cache, site, server_round, msg.content["arrays"].to_torch_state_dict(),
        dp_state=dp_state, site_local=_site_local(context),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    result = outcome.result
    if result.dp_state is not None:
        context.state["dp-state"] = ConfigRecord(dict(result.dp_state))
    if outcome.site_local:
        context.state["site-local"] = ArrayRecord(outcome.site_local)
    exhausted = result.skipped_reason is not None
    if exhausted:
        print(f"site {site}: not training this round: {result.skipped_reason}", flush=True)
    metrics = MetricRecord({
        "num-examples": 0 if exhausted else int(result.num_examples),
        "train-loss": float(result.mean_loss) if result.steps else float("nan"),
        "steps": int(result.steps),
        "epsilon": float(result.epsilon) if result.epsilon is not None else -1.0,
        "delta": float(result.delta) if result.delta is not None else -1.0,
        "dp-budget-exhausted": int(exhausted),
    })
    content = RecordDict({
        "arrays": ArrayRecord(outcome.state),
        "metrics": metrics,
        "site": ConfigRecord({"site": site, "skipped-reason": result.skipped_reason or ""}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    site, setting = resolve_site(context.node_config, cfg)
    cache = ensure_cache(site, setting, cfg)
    result = evaluate_site(cfg, cache, msg.content["arrays"].to_torch_state_dict(), _site_local(context))
    metrics = MetricRecord({
        "num-examples": int(result.num_examples),
        "loss": float(result.loss),
        "auroc-macro": float(result.auroc_macro),
        "auroc-per-class": [float(v) for v in result.auroc_per_class],
        "synthetic": int(is_synthetic_cache(cache)),
    })
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site": site})})
    return Message(content=content, reply_to=msg)


def _dp_state(context: Context) -> dict[str, Any] | None:
    if "dp-state" not in context.state:
        return None
    return dict(context.state["dp-state"])


def _site_local(context: Context):
    if not context.run_config.get("site-local", True) or "site-local" not in context.state:
        return None
    return context.state["site-local"].to_torch_state_dict()

