"""Running the ClientApp's functions and the server loop without Ray or a SuperLink.

The one place that touches Flower internals (kept here so a Flower upgrade breaks one file):
``flwr.app.metadata.Metadata`` to build a message as a SuperLink would deliver it, and
``flwr.supercore.task_identity.TaskIdentity``, which Flower's strategies read to stamp the
messages they create (set by the runtime in a real run).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app


def make_message(content: RecordDict, message_type: str, *, dst_node_id: int = 1, round_: int = 1) -> Message:
    """A message as a node receives it from the SuperLink."""
    metadata = Metadata(run_id=1, message_id=f"msg-{time.monotonic_ns()}", src_node_id=0,
                        dst_node_id=dst_node_id, reply_to_message_id="", group_id=str(round_),
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=metadata)


def make_context(node_config: Mapping[str, Any], run_config: Mapping[str, Any], node_id: int = 1) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(),
                   run_config=dict(run_config))


@contextlib.contextmanager
def server_task_identity():
    """What the ServerApp runtime sets before a strategy builds messages."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


HANDLERS = {"train": client_app.train, "evaluate": client_app.evaluate, "query": client_app.query}


def deliver(msg: Message, context: Context) -> Message:
    """Run the ClientApp function for ``msg`` as its node would, and return the reply.

    The outgoing message gets the id its delivered copy carries (a real Grid stamps ids when it
    pushes messages), so the server can match the reply to the message it answers.
    """
    delivered = make_message(msg.content, msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)
    msg.metadata.__dict__["_message_id"] = delivered.metadata.message_id
    reply = HANDLERS[msg.metadata.message_type](delivered, context)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


class InProcessGrid:
    """A Grid whose nodes are the ClientApp's functions called in this process.

    ``n_nodes`` simulated nodes (ids 101, 102, ...; node config ``partition-id``), then one
    deployed node per entry of ``node_configs`` (ids 201, 202, ...; e.g. ``{"site": "ptb",
    "data": "/path"}``). Each keeps its ``Context`` (and so its ``context.state``) for the
    grid's lifetime, like a node during one run. ``sent`` records every message delivered.
    """

    def __init__(self, run_config: Mapping[str, Any], n_nodes: int = 0,
                 node_configs: Iterable[Mapping[str, Any]] = ()):
        self.contexts = {
            101 + i: make_context({"partition-id": i, "num-partitions": n_nodes}, run_config, 101 + i)
            for i in range(n_nodes)
        }
        for i, node_config in enumerate(node_configs):
            self.contexts[201 + i] = make_context(node_config, run_config, 201 + i)
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent += messages
        return [deliver(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]
