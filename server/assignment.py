"""Which node plays which site. The server asks every node once (a Flower query message), then
names the site in each train/evaluate message it sends.

* A deployed node answers the site it is bound to (its node config); it plays only that site
  and refuses a message for another.
* With SuperNode authentication, the binding comes from the credentials: the coordinator
  registers each site's public key under the site's name (``flwr supernode register KEY.pub
  <connection> --name SITE``), and Flower gives the ServerApp each node's registered ``name``
  and ``public_key`` (``grid.get_nodes()``, ``NodeInfo``). A node with a registered name plays
  that site only; if it answers another site it is left out. A node without a registered name
  (a plain-text demo, or a key registered without ``--name``) is taken at its word, and the
  server says once that its site is self-declared.
* A simulated node answers ``*``: it may play any site of the run. The sites no bound node
  claims are dealt over these nodes (the fewest sites first; a site stays with the node that
  plays it), so Flower's default of two simulated nodes serves four sites and no Flower
  setting has to change for the run to start. A node gets one message at a time
  (:class:`OneMessagePerNode`), as a deployed node does.
* A second node claiming a site that already has one (the node playing it keeps it), or a node
  bound to a site that is not in the run's ``sites``, is left out, and the server says so; so
  is the reason a node gives when it cannot answer.

:func:`wait_for_sites` runs before round 1: it asks nodes as they connect until every site has a
node, or until ``node-wait-timeout`` (then the run goes on if at least ``min-nodes`` sites have
one, and fails with a clear message otherwise). :meth:`SiteAssignment.refresh`, called at every
round, asks nodes that connected since (a node that did not answer: every five minutes) and
gives the site of a node that left to another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from shared.federation.site_data import ANY_SITE

QUERY_TIMEOUT = 60.0  # seconds for the nodes to answer which site they play
ASK_AGAIN_AFTER = 300.0  # seconds before a node that did not answer is asked again


def ask_nodes(grid, node_ids: Iterable[int], timeout: float = QUERY_TIMEOUT,
              handshake: dict[str, str] | None = None) -> tuple[dict[int, str], dict[int, str]]:
    """``({node_id: site or '*'}, {node_id: error reason})`` for the nodes that answered in time.

    ``handshake`` (project version and model fingerprint, ``shared.federation.version``) goes
    into the question: a node running another version refuses, and its reason names both."""
    question = {"question": "sites", **(handshake or {})}
    messages = [Message(RecordDict({"config": ConfigRecord(question)}), dst_node_id=int(node),
                        message_type=MessageType.QUERY) for node in node_ids]
    if not messages:
        return {}, {}
    answers, errors = {}, {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    node_of_message = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():  # one the SuperLink raises on a node's behalf comes from the SuperLink
            node = node_of_message.get(reply.metadata.reply_to_message_id, node)
            errors[node] = str(reply.error.reason)
        elif "node" in reply.content.config_records:
            answers[node] = str(reply.content.config_records["node"]["sites"])
    return answers, errors


class SiteAssignment:
    """The run's sites, what each known node answered, and the node now playing each site."""

    def __init__(self, sites: Iterable[str], echo: Callable[[str], None] = print,
                 handshake: dict[str, str] | None = None):
        self.sites = list(sites)
        self.handshake = handshake
        self.answers: dict[int, str] = {}
        self.registered: dict[int, str] = {}  # node id -> the name its key was registered under
        # site -> since when the server has been looking for a node for it (the run's start, or
        # when its node left)
        self.missing_since: dict[str, float] = {site: time.monotonic() for site in self.sites}
        self.node_of_site: dict[str, int] = {}
        self.echo = echo
        self._reported: set[str] = set()
        self._asked_at: dict[int, float] = {}  # nodes that have not answered yet: when last asked

    # ------------------------------------------------------------------ queries
    def refresh(self, grid, timeout: float = QUERY_TIMEOUT, ask_again_after: float = ASK_AGAIN_AFTER) -> None:
        """Ask the nodes that connected since (a node that did not answer: again after
        ``ask_again_after`` seconds), forget the nodes that left, and re-deal the sites."""
        connected = self._connected(grid)
        gone = set(self.answers) - connected
        now = time.monotonic()
        new = sorted(n for n in connected - set(self.answers)
                     if n not in self._asked_at or now - self._asked_at[n] >= ask_again_after)
        if not gone and not new:
            return
        for node in gone:
            del self.answers[node]
        answers, errors = ask_nodes(grid, new, timeout, self.handshake)
        for node in new:
            self._asked_at[node] = now
        for node, reason in errors.items():
            self._report(f"node {node} did not say which site it plays: {reason}")
        for node in answers:
            self._asked_at.pop(node, None)
        self.answers.update(answers)
        self._deal()

    def _deal(self) -> None:
        self._deal_sites()
        now = time.monotonic()
        for site in self.sites:
            if site in self.node_of_site:
                self.missing_since.pop(site, None)
            else:
                self.missing_since.setdefault(site, now)

    def _connected(self, grid) -> set[int]:
        """The connected node ids; remembers each node's registered name (Flower's ``NodeInfo``
        from ``grid.get_nodes()``; a grid without names gives none)."""
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return {int(n) for n in grid.get_node_ids()}
        connected = set()
        for info in get_nodes():
            node = int(info.node_id)
            connected.add(node)
            name = str(getattr(info, "name", "") or "")
            if name:
                self.registered[node] = name
        return connected
    def _deal_sites(self) -> None:
        """Bound nodes get their sites (the node already playing a site keeps it against a
        newcomer's claim); the other sites stay with the ``*`` node that plays them, and the
        ones without a node go to the ``*`` node with the fewest sites."""
        previous = self.node_of_site
        bound: dict[str, int] = {}
        claims = sorted(self.answers.items(), key=lambda item: (previous.get(item[1]) != item[0], item[0]))
        for node, site in claims:
            name = self.registered.get(node)
            if name is not None and site != name:
                self._report(f"node {node} is registered as site {name!r} but answers {site!r}: it is left out")
                continue
            if name is None and site != ANY_SITE:
                self._report(f"node {node} has no registered name: its site {site!r} is its own claim "
                             f"(bind it: flwr supernode register KEY.pub <connection> --name {site})")
            if site == ANY_SITE:
                continue
            if site not in self.sites:
                self._report(f"node {node} plays site {site!r}, which is not in this run's sites "
                             f"{self.sites}: it is left out")
            elif site in bound:
                self._report(f"node {node} also claims site {site!r} (node {bound[site]} plays it): "
                             "it is left out")
            else:
                bound[site] = node
        flexible = sorted(node for node, site in self.answers.items() if site == ANY_SITE)
        self.node_of_site = dict(bound)
        load = {node: 0 for node in flexible}
        unbound = [site for site in self.sites if site not in bound]
        for site in unbound:
            if previous.get(site) in load:
                self.node_of_site[site] = previous[site]
                load[previous[site]] += 1
        for site in unbound:
            if site not in self.node_of_site and load:
                node = min(load, key=lambda n: (load[n], n))
                self.node_of_site[site] = node
                load[node] += 1

    def _report(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            self.echo(line)

    # ------------------------------------------------------------------ views
    @property
    def served(self) -> list[str]:
        """The sites that have a node, in the run config's order."""
        return [site for site in self.sites if site in self.node_of_site]

    @property
    def missing(self) -> list[str]:
        return [site for site in self.sites if site not in self.node_of_site]

    def describe(self) -> str:
        by_node: dict[int, list[str]] = {}
        for site in self.served:
            by_node.setdefault(self.node_of_site[site], []).append(site)
        return "; ".join(f"node {node}: {','.join(sites)}" for node, sites in by_node.items())


def wait_for_sites(grid, sites: list[str], min_sites: int, timeout: float,
                   echo: Callable[[str], None] = print, stop: threading.Event | None = None,
                   handshake: dict[str, str] | None = None) -> SiteAssignment:
    """A node for every site, or for at least ``min_sites`` of them after ``timeout`` seconds.

    ``stop`` (set by the caller) ends the wait early with an error.
    """
    assignment = SiteAssignment(sites, echo, handshake)
    deadline = time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set():
            raise RuntimeError("stopped while waiting for the nodes")
        assignment.refresh(grid, timeout=max(1.0, min(QUERY_TIMEOUT, deadline - time.monotonic())),
                           ask_again_after=0.0)  # before round 1, a silent node is asked each time
        if not assignment.missing:
            return assignment
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(assignment.served) >= min_sites:
        echo(f"after {timeout:.0f} s no node plays site(s) {assignment.missing}; going on with "
             f"{assignment.served} (min-nodes = {min_sites})")
        return assignment
    connected = len(list(grid.get_node_ids()))
    raise RuntimeError(
        f"after {timeout:.0f} s, no node plays site(s) {assignment.missing} "
        f"({connected} node(s) connected, {len(assignment.served)} of {len(sites)} sites served, "
        f"the run needs {min_sites}). Deployment: start one SuperNode per site "
        "(python -m client --site SITE ...); simulation: every simulated node plays any site."
    )


class OneMessagePerNode:
    """The grid as the strategy sees it: a node is sent one message at a time.

    A simulated node that plays two sites gets two messages a round. Flower's simulation engine
    would run them at once on two Ray workers, each with a copy of the node's ``context.state``,
    and keep whichever copy came back last: one site's DP accountant and site-local values would
    be lost. So the messages go out in waves, no node twice in a wave, all within the round's
    ``timeout``. With one message per node (deployment, or a node per site) this is one wave.
    """

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waves: list[list[Message]] = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            wave = next((w for w in waves if all(m.metadata.dst_node_id != node for m in w)), None)
            if wave is None:
                waves.append(wave := [])
            wave.append(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for wave in waves:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            replies += list(self.grid.send_and_receive(wave, timeout=left))
        return replies
