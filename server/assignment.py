"""Which node plays which site. The server asks every node once (a Flower query message), then
names the site in each train/evaluate message it sends.

* A deployed node answers the site it is bound to (its node config); it plays only that site
  and refuses a message for another.
* A simulated node answers ``*``: it may play any site of the run. The sites no bound node
  claims are dealt round-robin over these nodes, so Flower's default of two simulated nodes
  serves four sites (each node plays two, one after the other) and no Flower setting has to
  change for the run to start.
* A second node claiming a site that already has one, or a node bound to a site that is not in
  the run's ``sites``, is left out, and the server says so.

:func:`wait_for_sites` runs before round 1: it asks nodes as they connect until every site has a
node, or until ``node-wait-timeout`` (then the run goes on if at least ``min-nodes`` sites have
one, and fails with a clear message otherwise). :meth:`SiteAssignment.refresh`, called at every
round, asks nodes that connected since and gives the site of a node that left to another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from shared.federation.site_data import ANY_SITE

QUERY_TIMEOUT = 60.0  # seconds for the nodes to answer which site they play


def ask_nodes(grid, node_ids: Iterable[int], timeout: float = QUERY_TIMEOUT) -> dict[int, str]:
    """``{node_id: site or '*'}`` for the nodes that answered in time."""
    messages = [Message(RecordDict({"config": ConfigRecord({"question": "sites"})}), dst_node_id=int(node),
                        message_type=MessageType.QUERY) for node in node_ids]
    if not messages:
        return {}
    answers = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and "node" in reply.content.config_records:
            answers[int(reply.metadata.src_node_id)] = str(reply.content.config_records["node"]["sites"])
    return answers


class SiteAssignment:
    """The run's sites, what each known node answered, and the node now playing each site."""

    def __init__(self, sites: Iterable[str], echo: Callable[[str], None] = print):
        self.sites = list(sites)
        self.answers: dict[int, str] = {}
        self.node_of_site: dict[str, int] = {}
        self.echo = echo
        self._reported: set[str] = set()

    # ------------------------------------------------------------------ queries
    def refresh(self, grid, timeout: float = QUERY_TIMEOUT) -> None:
        """Ask the nodes not asked yet, forget the nodes that left, and re-deal the sites."""
        connected = {int(n) for n in grid.get_node_ids()}
        gone = set(self.answers) - connected
        new = sorted(connected - set(self.answers))
        if not gone and not new:
            return
        for node in gone:
            del self.answers[node]
        self.answers.update(ask_nodes(grid, new, timeout))
        self._deal()

    def _deal(self) -> None:
        bound: dict[str, int] = {}
        for node, site in sorted(self.answers.items()):
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
        unbound = [site for site in self.sites if site not in bound]
        self.node_of_site = dict(bound)
        if flexible:
            for i, site in enumerate(unbound):
                self.node_of_site[site] = flexible[i % len(flexible)]

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
                   echo: Callable[[str], None] = print) -> SiteAssignment:
    """A node for every site, or for at least ``min_sites`` of them after ``timeout`` seconds."""
    assignment = SiteAssignment(sites, echo)
    deadline = time.monotonic() + timeout
    while True:
        assignment.refresh(grid, timeout=max(1.0, min(QUERY_TIMEOUT, deadline - time.monotonic())))
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
