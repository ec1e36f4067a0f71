"""The member's task executor (member_node.executor): its retries end, and it says when the app
the coordinator submitted is not the kyodo it runs. Serving real tasks from a real SuperNode is
tests/test_deployment.py's slow scenario."""

import http.server
import logging
import threading

import httpx
import pytest

from member_node import executor as ex
from member_node import supernode


class _Replies(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperNode runtime API: the statuses to answer in turn, then 200 with ``body``."""

    statuses: list[int] = []
    body = b""
    calls = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).calls += 1
        status = self.statuses.pop(0) if self.statuses else 200
        body = self.body if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, *_args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replies)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def _get(url):
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return response


def test_a_busy_supernode_is_retried_and_a_refusal_is_not(server):
    httpd, url = server
    _Replies.statuses, _Replies.calls = [503, 503], 0
    assert ex._bounded_retries(max_time=30).invoke(_get, url).status_code == 200
    assert _Replies.calls == 3
    # A refusal (the task or run is gone) ends the task at once: Flower's own retries answer a
    # 401 by sending SIGINT to the process, which here would end every later task too.
    for status in (401, 403, 404):
        _Replies.statuses, _Replies.calls = [status], 0
        with pytest.raises(httpx.HTTPStatusError):
            ex._bounded_retries(max_time=30).invoke(_get, url)
        assert _Replies.calls == 1


def test_retries_end_when_the_supernode_stays_unavailable(server):
    """A heartbeat that retried forever kept a deployment test's executor from its next run."""
    _httpd, url = server
    _Replies.statuses, _Replies.calls = [503] * 1000, 0
    with pytest.raises(httpx.HTTPStatusError):
        ex._bounded_retries(max_time=1.0).invoke(_get, url)
    assert 1 < _Replies.calls < 1000


def test_another_app_than_the_installed_kyodo_is_said_once_per_run(caplog):
    executor = ex.TaskExecutor("127.0.0.1:1")  # nothing listens: nothing here calls it
    with caplog.at_level(logging.WARNING, logger="kyodo.member.executor"):
        executor._compare_bundle(7, ex.APP_ID, executor.version)
        assert caplog.text == ""
        for _ in range(2):
            executor._compare_bundle(8, "someone/else", "9.9")
    assert caplog.text.count("run 8 was submitted with app someone/else 9.9") == 1
    assert "never with code the coordinator sends" in caplog.text


def test_the_supernode_leaves_clientapps_to_the_members_executor():
    cmd = supernode.executor_command(9301)
    assert cmd[1:4] == ["-P", "-m", "member_node.executor"], "the working directory must not shadow the package"
    assert cmd[-2:] == ["--runtime-api-address", "127.0.0.1:9301"]


def test_heartbeats_end_with_their_task_even_while_every_beat_fails(server, monkeypatch):
    """Flower's HeartbeatSender retries a failed beat until one succeeds, and its stop waits for
    that: after a SuperLink outage a deployment test's executor hung there for good."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse  # pylint: disable=E0611

    httpd, url = server
    address = url.removeprefix("http://").rstrip("/")
    monkeypatch.setattr(ex, "HEARTBEAT_S", 0.05)
    _Replies.statuses, _Replies.calls = [503] * 10_000, 0
    done, abandoned = threading.Event(), threading.Event()
    beat = threading.Thread(target=ex._heartbeats, args=(ex._client(address, max_time=0.2), done, abandoned))
    beat.start()
    while _Replies.calls < 3:
        done.wait(0.05)
    done.set()
    beat.join(timeout=10)
    assert not beat.is_alive() and not abandoned.is_set()
    # A beat the SuperNode refuses (its run stopped) marks the task abandoned: its reply is not sent.
    _Replies.statuses, _Replies.body = [], SendTaskHeartbeatResponse(success=False).SerializeToString()
    done, abandoned = threading.Event(), threading.Event()
    beat = threading.Thread(target=ex._heartbeats, args=(ex._client(address, max_time=0.2), done, abandoned))
    beat.start()
    assert abandoned.wait(timeout=10)
    done.set()
    beat.join(timeout=10)
    _Replies.body = b""
