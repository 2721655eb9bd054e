"""Screen the sites' training replies before they are aggregated, and keep a record of every
site left out of a round and why.

A reply is excluded when
* it is an error instead of a result (the node died, timed out, or its ClientApp raised);
* its arrays do not match the global model it was sent: a missing or extra array, or an array
  of another shape;
* an array holds NaN or +-inf, or its ``num-examples`` is not a finite number >= 0.

A node that got the round's message but sent nothing back before the round ended is recorded
too ("no reply"). A reply naming no site, or another site than the message it answers, is
excluded too.
Excluded replies never reach Flower's aggregation, so one broken site cannot
poison the global model.

The one policy for a short round (:meth:`ReplyGuard.require`, used by the strategy after
screening and by the round's end in ``server.rounds``): a round aggregates when at least
``min-replies`` valid training replies arrived (run config; default a majority of the sites).
With fewer, the run ends with :class:`RoundFailed`, whose message names the round, the sites
that replied and why each other site was left out; the last aggregated model stays in
``checkpoint.pt`` (``resume = true`` continues from it once enough sites are back). The same
error ends a round that cannot start because fewer than ``min-replies`` sites have a node after
``node-wait-timeout`` seconds (``server.strategies``).

The record is ``failures.csv`` in the run's output dir (rewritten atomically after each round):
``round, site, node_id, time_utc, reason``. ``site`` is the site the server's message was for
(or, for messages sent without one, the site an earlier reply of that node named; '?' if none).

How it plugs into a strategy (``server.strategies.SiteTracking``)::

    guard = ReplyGuard()
    # configure_train: remember what went out, and the site each message is for
    guard.sent(rnd, arrays, messages, sites)
    # aggregate_train: drop what must not be averaged
    replies = guard.screen(rnd, replies)
    guard.write(out_dir / FAILURES_CSV)
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message

FAILURES_CSV = "failures.csv"
FAILURE_COLUMNS = ("round", "site", "node_id", "time_utc", "reason")


class RoundFailed(RuntimeError):
    """A round cannot aggregate (too few valid replies, or too few sites with a node): the run ends."""


@dataclass(frozen=True)
class Exclusion:
    """One site left out of one round's aggregate."""

    round: int
    site: str
    node_id: int
    time_utc: str
    reason: str


def check_arrays(reply: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why ``reply`` cannot be averaged with ``reference`` (None when it can)."""
    missing = [k for k in reference if k not in reply]
    extra = [k for k in reply if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing arrays {_names(missing)}")
        if extra:
            parts.append(f"unexpected arrays {_names(extra)}")
        return "; ".join(parts)
    for key, ref in reference.items():
        got = reply[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"array '{key}' has shape {tuple(got.shape)}, the global model's is {tuple(ref.shape)}"
    for key in reference:
        values = reply[key].numpy()
        if np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                return f"array '{key}' holds {bad} NaN/inf value(s)"
    return None


def check_reply(msg: Message, reference: ArrayRecord | None, weight_key: str = "num-examples") -> str | None:
    """Why a training reply must be excluded (None when it is usable)."""
    if msg.has_error():
        return f"error reply: {msg.error.reason} (code {msg.error.code})"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return f"'{weight_key}' is {weight!r}, not a finite number >= 0"
    if reference is not None:
        return check_arrays(next(iter(content.array_records.values())), reference)
    return None


class ReplyGuard:
    """Remembers what each round sent, screens what came back, and records exclusions."""

    def __init__(self, weight_key: str = "num-examples") -> None:
        self.weight_key = weight_key
        self.exclusions: list[Exclusion] = []
        self.site_of_node: dict[int, str] = {}
        self._reference: dict[int, ArrayRecord] = {}
        self._sent: dict[int, list[tuple[Message, str | None]]] = {}

    def sent(self, server_round: int, arrays: ArrayRecord, messages: Iterable[Message],
             sites: Iterable[str] | None = None) -> None:
        """Keep the round's outgoing messages (and the site each is for, when the server named
        one): the Grid stamps their ids when it pushes them."""
        messages = list(messages)
        site_list = list(sites) if sites is not None else [None] * len(messages)
        self._reference[server_round] = arrays
        self._sent[server_round] = list(zip(messages, site_list))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies fit for aggregation; every other one is recorded as an exclusion."""
        reference = self._reference.get(server_round)
        sent = {m.metadata.message_id: (m.metadata.dst_node_id, site)
                for m, site in self._sent.get(server_round, []) if m.metadata.message_id}
        kept: list[Message] = []
        answered: set[str] = set()
        for msg in replies:
            node, site = sent.get(msg.metadata.reply_to_message_id, (None, None))
            answered.add(msg.metadata.reply_to_message_id)
            if node is None or not msg.has_error():
                node = int(msg.metadata.src_node_id)  # an error the SuperLink raises comes from node 1
            named = None if msg.has_error() else _site_name(msg)
            site = site or named
            if site and site == named:
                self.site_of_node[node] = site
            reason = check_reply(msg, reference, self.weight_key)
            if reason is None and named is None:
                reason = "the reply names no site"
            elif reason is None and site != named:
                reason = f"the reply names site {named!r}, the message was for site {site!r}"
            if reason is None:
                kept.append(msg)
            else:
                self._exclude(server_round, node, reason, site)
        for message_id, (node, site) in sent.items():
            if message_id not in answered:
                self._exclude(server_round, int(node), "no reply before the round ended", site)
        return kept

    def unserved(self, server_round: int, site: str) -> None:
        """Record a site that got no message this round: no node plays it (its node left)."""
        self._exclude(server_round, 0, "no node plays this site", site)

    def load(self, path: Path, up_to_round: int) -> None:
        """Keep the exclusions an earlier (resumed) run recorded for rounds <= ``up_to_round``."""
        if not path.is_file():
            return
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if int(row["round"]) <= up_to_round:
                    self.exclusions.append(Exclusion(int(row["round"]), row["site"],
                                                     int(row["node_id"]), row["time_utc"], row["reason"]))
                    if row["site"] != "?":
                        self.site_of_node.setdefault(int(row["node_id"]), row["site"])

    def require(self, server_round: int, replied: Iterable[str], min_replies: int) -> None:
        """The short-round policy: raise :class:`RoundFailed` when fewer than ``min_replies``
        sites sent a valid training reply in ``server_round``."""
        replied = sorted(set(replied))
        if len(replied) >= min_replies:
            return
        why = "; ".join(f"{e.site}: {e.reason} ({e.time_utc})" for e in self.exclusions
                        if e.round == server_round and e.site not in replied)
        raise RoundFailed(
            f"round {server_round}: {len(replied)} valid training repl{'y' if len(replied) == 1 else 'ies'} "
            f"(from {', '.join(replied) or 'no site'}), the round needs min-replies = {min_replies}"
            + (f"; left out: {why}" if why else "")
            + f". The run ends here; checkpoint.pt holds the model of round {server_round - 1} "
            "(resume = true continues from it once enough sites are back)"
        )

    def excluded_sites(self, server_round: int) -> list[str]:
        return [e.site for e in self.exclusions if e.round == server_round]

    def write(self, path: Path) -> None:
        """``failures.csv``, atomically (tmp + os.replace); header only when nothing failed."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(FAILURE_COLUMNS)
        for e in self.exclusions:
            writer.writerow([e.round, e.site, e.node_id, e.time_utc, e.reason])
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, path)

    def _exclude(self, server_round: int, node: int, reason: str, site: str | None = None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        site = site or self.site_of_node.get(node, "?")
        self.exclusions.append(Exclusion(server_round, site, node, stamp, reason))


def _site_name(msg: Message) -> str | None:
    record = msg.content.config_records.get("site")
    if record is None or "site" not in record:
        return None
    return str(record["site"])


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
