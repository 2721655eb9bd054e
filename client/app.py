"""The Flower ClientApp: a hospital site. Messages in, ``shared.federation.site_training`` calls,
messages out.

Every train/evaluate message names the site it is for (``config["site"]``), chosen by the
server from what each node answered to its query:

* query -> ``ConfigRecord({"sites": ...})``: the site this node is bound to (deployment: node
  config ``site`` and ``data``, the site's prepared cache), or ``*`` (simulation: a node with only
  a ``partition-id`` may play any site of the run config's ``sites``, with the cache from the run
  config, ``cache-<site>``, '' = the embedded synthetic data generated on first use);
* a message for a site this node may not play gets an error reply ``refused: ...`` that the
  server records in ``failures.csv``; nothing is trained;
* every message (query included) carries the coordinator's project version and model
  fingerprint (``shared.federation.version``); a node running another version or model
  definition refuses it, naming both versions.

Under DP the site's privacy ledger lives on the site's disk, not in Flower's state: a deployed
node's ``state-dir`` (``python -m client --state-dir``), a simulated site's
``<out-dir>/sites/<site>`` (see ``shared.privacy``, docs/privacy.md). The site's policy (node
config; in simulation the run config's ``site-policy``) is checked first: a run that breaks it,
a spent budget, an unusable ledger or state dir gets an error reply ``refused: ...``.
``context.state`` holds ``site-local/<site>`` (ArrayRecord: the site's own values of the
model's site-local parameters, e.g. BatchNorm statistics kept local as in FedBN; run config
``site-local = false`` turns this off); it lasts one run.

Train reply: ``arrays`` (the locally trained weights) and ``metrics`` with ``num-examples``,
``steps``, ``epsilon``/``delta`` (the dataset's lifetime epsilon from the site's ledger; -1 when
DP is off), ``dp-budget-exhausted`` (1 = the site did not train: its next round would exceed
the run's epsilon budget; it then sends ``num-examples`` 0, which the server leaves out of the
aggregate); without DP ``train-loss``; under DP no loss (it is not noised) but
``dp-sample-rate``, ``dp-noise-multiplier``, ``dp-max-grad-norm`` and ``dp-units-<unit>`` (the
number of privacy units, treated as public like ``num-examples``).
A ``site`` ConfigRecord names the site. Evaluate reply: ``num-examples``, ``loss``,
``auroc-macro`` (NaN when undefined), ``auroc-per-class`` and ``synthetic`` (1 = the site's
cache is synthetic data).
"""

from __future__ import annotations

import re
from pathlib import PurePath

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.federation.quiet import quiet_third_party_warnings
from shared.federation.run_config import load_run_config
from shared.federation.site_data import SiteRefused, ensure_cache, is_synthetic_cache, playable_sites, resolve_site
from shared.federation.version import VersionMismatch, check_handshake
from shared.federation.site_training import evaluate_site, train_site
from shared.federation.run_config import ConfigError
from shared.federation.site_data import site_policy, site_state_dir
from shared.privacy.policy import PrivacyRefused

# Error code of a refusal (Flower's "ClientApp raised an exception" code; the reason says why).
REFUSED_CODE = 2

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which site(s) this node may play: its bound site, or ``*`` (any site of the run); refused
    when the coordinator runs another project version or model definition."""
    try:
        check_handshake(msg.content["config"], load_run_config(context.run_config))
    except VersionMismatch as exc:
        return _refusal(msg, exc)
    return Message(content=RecordDict({"node": ConfigRecord({"sites": playable_sites(context.node_config)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    quiet_third_party_warnings(bool(cfg.verbose))
    config = msg.content["config"]
    try:
        check_handshake(config, cfg)
        site, setting = resolve_site(context.node_config, cfg, str(config.get("site", "")))
    except (SiteRefused, VersionMismatch) as exc:
        return _refusal(msg, exc)
    cache = ensure_cache(site, setting, cfg)
    server_round = int(config["server-round"])  # absolute, also after a resume
    try:
        policy = site_policy(context.node_config, cfg, site)
        state_dir = site_state_dir(context.node_config, cfg, site)
        if cfg.dp and state_dir is None:
            raise PrivacyRefused("DP needs the site's state directory for its privacy ledger: start the node "
                                 "with `python -m client --state-dir DIR` (node config state-dir)")
        if cfg.dp and "site" in context.node_config and not str(context.node_config.get("data", "") or ""):
            # the run config's cache-<site> would let the coordinator pick the data (and the ledger)
            raise PrivacyRefused("DP at a deployed site needs its own data path (node config data; "
                                 "`python -m client --data`), not the run config's cache")
        outcome = train_site(
            cfg, cache, site, server_round, msg.content["arrays"].to_torch_state_dict(),
            site_local=_site_local(context, cfg, site), proximal_mu=float(config.get("proximal-mu", 0.0)),
            state_dir=state_dir, policy=policy,
        )
    except (PrivacyRefused, ConfigError) as exc:
        return _refusal(msg, exc)
    result = outcome.result
    if outcome.site_local:
        context.state[f"site-local/{site}"] = ArrayRecord(outcome.site_local)
    exhausted = result.skipped_reason is not None
    if exhausted:
        print(f"site {site}: not training this round: {result.skipped_reason}", flush=True)
    values = {
        "num-examples": 0 if exhausted else int(result.num_examples),
        "steps": int(result.steps),
        "epsilon": float(result.epsilon) if result.epsilon is not None else -1.0,
        "delta": float(result.delta) if result.delta is not None else -1.0,
        "dp-budget-exhausted": int(exhausted),
    }
    if outcome.dp_report is None:  # without DP only: a loss on private data is not noised
        values["train-loss"] = float(result.mean_loss) if result.steps else float("nan")
    else:
        report = outcome.dp_report
        values.update({"dp-sample-rate": float(report["sample-rate"]),
                       "dp-noise-multiplier": float(report["noise-multiplier"]),
                       "dp-max-grad-norm": float(report["max-grad-norm"]),
                       f"dp-units-{report['unit']}": int(report["units"])})
    metrics = MetricRecord(values)
    content = RecordDict({
        "arrays": ArrayRecord(outcome.state),
        "metrics": metrics,
        "site": ConfigRecord({"site": site, "skipped-reason": result.skipped_reason or ""}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    quiet_third_party_warnings(bool(cfg.verbose))
    try:
        check_handshake(msg.content["config"], cfg)
        site, setting = resolve_site(context.node_config, cfg, str(msg.content["config"].get("site", "")))
    except (SiteRefused, VersionMismatch) as exc:
        return _refusal(msg, exc)
    try:
        if cfg.dp and not site_policy(context.node_config, cfg, site).evaluate:
            raise PrivacyRefused("site policy dp-evaluate = false: under DP this site sends no evaluation "
                                 "(its validation loss and AUROC are not noised)")
    except ConfigError as exc:
        return _refusal(msg, exc)
    cache = ensure_cache(site, setting, cfg)
    result = evaluate_site(cfg, cache, msg.content["arrays"].to_torch_state_dict(), _site_local(context, cfg, site))
    metrics = MetricRecord({
        "num-examples": int(result.num_examples),
        "loss": float(result.loss),
        "auroc-macro": float(result.auroc_macro),
        "auroc-per-class": [float(v) for v in result.auroc_per_class],
        "synthetic": int(is_synthetic_cache(cache)),
    })
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site": site})})
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, exc: ValueError) -> Message:
    """An error reply ``refused: <reason>``; the reason leaves without the site's file paths (a
    path is cut to its file name); the full text stays in the site's log."""
    print(f"refused a {msg.metadata.message_type} message: {exc}", flush=True)
    return Message(Error(code=REFUSED_CODE, reason=f"refused: {public_reason(str(exc))}"), reply_to=msg)


_PATH = re.compile(r"(?<![\w.~])(?:~|/)[^\s'\"`,;()]*")


def public_reason(text: str) -> str:
    """``text`` with every absolute (or ``~``) path cut to its last component."""

    def name(match: re.Match) -> str:
        path = match.group(0)
        tail = len(path) - len(path.rstrip(".:"))
        core = path[: len(path) - tail] if tail else path
        return (PurePath(core).name or "<path>") + path[len(core):]

    return _PATH.sub(name, text)


def _site_local(context: Context, cfg, site: str):
    key = f"site-local/{site}"
    if not cfg.site_local or key not in context.state:
        return None
    return context.state[key].to_torch_state_dict()
