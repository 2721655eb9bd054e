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


class InProcessGrid:
    """A Grid whose nodes are the ClientApp's train/evaluate functions called in this process.

    Node ``i`` (ids 101, 102, ...) is simulation partition ``i``; each keeps its ``Context`` (and
    so its ``context.state``) for the grid's lifetime, like a node during one run.
    """

    def __init__(self, run_config: Mapping[str, Any], n_nodes: int):
        self.contexts = {
            101 + i: make_context({"partition-id": i, "num-partitions": n_nodes}, run_config, 101 + i)
            for i in range(n_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            delivered = make_message(msg.content, msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)
            handler = client_app.train if msg.metadata.message_type == "train" else client_app.evaluate
            replies.append(handler(delivered, self.contexts[msg.metadata.dst_node_id]))
        return replies
