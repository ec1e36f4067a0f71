"""The member's own executor of ClientApp tasks: the node runs the code its member installed.

Flower's default SuperNode (``--isolation subprocess``) starts ``flwr-clientapp`` for every
message, and that process installs the app bundle the coordinator submitted with ``flwr run``
and imports the ClientApp from it, ahead of the member's own installation on ``sys.path``
(a review loaded ``member_node/node.py`` and ``privacy/dp_sgd.py`` from
``<node>/flwr-home/apps/...``). The budget checks, the refusals, the noise and what a reply
holds would then be whatever code the coordinator ships: a member could not hold its
guarantee against the coordinator it is meant to hold against. Flower's own remedy, signed
bundles checked against ``--trusted-entities``, needs verifications that the open-source
SuperLink does not issue.

So ``kyodo-member start`` runs the SuperNode with ``--isolation process`` and this process
beside it. It takes each task from the SuperNode's runtime API on the loopback (as
``flower-superexec`` would), pulls the message and context, and answers with the ClientApp of
the kyodo the member installed. The bundle the coordinator sent is never installed or read:
only its name and version are compared with this installation's, and a difference is said
once per run in the member's log. The run configuration still comes from the coordinator,
validated as before (``shared_model.config``).

The process stays up between messages, so a message no longer pays for importing torch and
the node's modules (3.7 s per message measured here, ``bench/clientapp_start.py``). Each task
still gets a node built afresh, as a ClientApp process did: a member that changes its data
or budget between runs is read again. Tasks run one at a time: Flower keeps the task's
identity in process globals (``TaskIdentity``), and a node's messages arrive one after another.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
import time
from importlib import metadata

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("kyodo.member.executor")

APP_ID = "kyodo/kyodo"  # publisher/name of the app bundle ``flwr run`` builds from pyproject.toml
POLL_S = 0.2  # between task polls when idle (Flower's SuperExec polls every 1 s)
PULL_MAX_S = 60.0  # to pull a message's objects from the SuperNode, which holds them already
HEARTBEAT_S = 20.0  # Flower's task heartbeat period: (30 s interval - 5 s call timeout) x 0.8
TASK_RETRY_S = 30.0  # how long one call to the SuperNode is retried before the task is given up
RETRYABLE_STATUS = frozenset({502, 503, 504})


def installed_version() -> str:
    try:
        return metadata.version("kyodo")
    except metadata.PackageNotFoundError:  # run from a checkout without installing it
        return "unknown"


def _bounded_retries(max_time: float) -> RetryInvoker:
    """Retries that end. Flower's own (``make_simple_http_retry_invoker``) retry a refused or
    unavailable call forever and answer a 401 by sending SIGINT to the process: right for a
    process that lives for one message, not for one that serves them all. In a deployment test
    whose SuperLink was killed mid-round, a task's last heartbeat retried forever and the
    executor never took the next run's query."""

    def give_up(err: Exception) -> bool:
        return isinstance(err, httpx.HTTPStatusError) and err.response.status_code not in RETRYABLE_STATUS

    return RetryInvoker(
        lambda: exponential(max_delay=5),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=give_up,
    )


def _client(address: str, *interceptors, max_time: float = TASK_RETRY_S) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's runtime API on this machine's loopback
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=_bounded_retries(max_time),
    )


def _pull_task_input(client: RuntimeHttpClient, abandoned: threading.Event) -> tuple[Message, Context, Run]:
    """The task's message, context and run, as Flower's ``pull_task_input`` gets them, but with
    the message's objects pulled under a bound. The SuperNode holds a message's objects before
    it offers its task, so one still missing will not come; Flower's pull retries such an
    object for up to 2 hours (``PULL_MAX_TIME``). A ClientApp process stuck there held up only
    itself; this process serves every message, and a deployment test's restarted node, handed
    a task for a message of the run its SuperLink had lost, never answered the resumed run."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_unless_abandoned(object_id: str) -> bytes:
        if abandoned.is_set():
            raise ObjectPullError(object_id, "the SuperNode dropped the task (its run no longer runs)")
        return pull_object(object_id)

    message = pull_and_inflate_object_from_tree(
        tree,
        pull_unless_abandoned,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=PULL_MAX_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message lacks its own id
    return message, context, run


def _heartbeats(client: RuntimeHttpClient, done: threading.Event, abandoned: threading.Event) -> None:
    """The task's heartbeats until ``done``. Not Flower's ``HeartbeatSender``: it retries a
    failed beat until one succeeds and its ``stop`` waits for that, so after a SuperLink outage
    a dead task's beats never succeeded and the executor hung in ``stop`` for good (a
    deployment test's restarted node never answered the resumed run); and Flower's beat raises
    SIGINT in the process when the SuperNode drops the task, which here would end the executor.
    A failed beat is skipped; a refused one marks the task abandoned (its reply is not sent)."""
    while not done.wait(HEARTBEAT_S):
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                abandoned.set()
        except httpx.HTTPError:
            continue


class TaskExecutor:
    """Takes the SuperNode's ClientApp tasks one by one and answers them with the installed app."""

    def __init__(self, runtime_address: str) -> None:
        from member_node import client_app  # imported once: what a ClientApp process paid per message

        self.client_app = client_app
        self.runtime_address = runtime_address
        self.version = installed_version()
        self._told_bundle: set[int] = set()  # runs whose bundle mismatch was said already
        self.poller = _client(runtime_address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))

    def next_token(self) -> str | None:
        res = self.poller.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return res.token if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> None:
        client = _client(
            self.runtime_address,
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        abandoned, done = threading.Event(), threading.Event()
        beat = threading.Thread(target=_heartbeats, args=(client, done, abandoned), daemon=True)
        beat.start()
        context = message = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run = _pull_task_input(client, abandoned)
            self._compare_bundle(run.run_id, run.fab_id, run.fab_version)
            started = time.monotonic()
            # A node built afresh per task, as a ClientApp process had it.
            self.client_app.forget_nodes()
            reply = self.client_app.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            log.info("%s answered in %.1f s", message.metadata.message_type, time.monotonic() - started)
        except Exception as err:  # noqa: BLE001 - the executor serves the next task
            log.exception("task failed")
            details = f"{type(err).__name__}"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            done.set()
            beat.join(timeout=1.0)  # a beat in flight ends on its own; the next task does not wait for it
        try:
            if reply is not None and context is not None and not abandoned.is_set():
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        except Exception:  # noqa: BLE001
            log.exception("could not hand the reply back to the SuperNode")
        finally:
            client.close()

    def _compare_bundle(self, run_id: int, fab_id: str, fab_version: str) -> None:
        if run_id in self._told_bundle:
            return
        self._told_bundle.add(run_id)
        if fab_id != APP_ID or fab_version != self.version:
            log.warning(
                "run %d was submitted with app %s %s; this node answers with the kyodo it has installed (%s), "
                "never with code the coordinator sends",
                run_id,
                fab_id or "?",
                fab_version or "?",
                self.version,
            )

    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; a stop signal during a task ends that task at once, as
        it ended a ClientApp process (the ledger is written ahead: a cut round stays spent)."""
        self.busy = False
        while not stop.is_set():
            try:
                token = self.next_token()
            except httpx.HTTPError as err:  # the SuperNode starting or restarting
                log.debug("runtime API not reachable: %s", err)
                stop.wait(1.0)
                continue
            if token is None:
                stop.wait(POLL_S)
                continue
            self.busy = True
            try:
                self.run_task(token)
            finally:
                self.busy = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m member_node.executor", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API, host:port")
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process (the SuperNode) ends")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT to itself once the SuperNode is gone
    # WARNING as a ClientApp process had it (the node's notes to its member), and one line per
    # task from here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck executor is
    stop = threading.Event()
    executor = TaskExecutor(args.runtime_api_address)

    def on_signal(signum: int, _frame) -> None:
        # At once, busy or not: an idle executor may sit in a retried poll of a SuperNode that is
        # itself stopping (a walkthrough's `kyodo-member start` took up to 19 s to end).
        stop.set()
        raise SystemExit(128 + signum if getattr(executor, "busy", False) else 0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    executor.serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
