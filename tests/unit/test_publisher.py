"""The engine loop's output thread (engine/publisher.py): decodes, then delivers in queue order."""

import threading

from loraplex_server.engine.output import PendingText
from loraplex_server.engine.publisher import OutputPublisher
from loraplex_server.engine.request import RequestOutput


class Detok:
    def __init__(self, log):
        self.log = log

    def add(self, token_id):
        self.log.append(("decode", token_id))
        return f"<{token_id}>"


def delta(request_id, tokens, finished=False):
    return RequestOutput(request_id, tuple(tokens), "", finished)


def test_texts_are_decoded_before_delivery_in_queue_order_on_one_thread():
    seen, threads = [], set()

    def deliver(out):
        threads.add(threading.current_thread().name)
        seen.append((out.request_id, out.token_ids, out.text))
    publisher = OutputPublisher(deliver)
    log: list = []
    first, second, final = delta("a", [1]), delta("a", [2, 3]), delta("a", [], finished=True)
    publisher.publish([first, delta("b", [9])], [PendingText(first, Detok(log), (1,))])
    publisher.publish([second], [PendingText(second, Detok(log), (2, 3))])
    publisher.publish([], [])  # nothing: not queued
    publisher.publish([final], [])
    publisher.close()
    assert seen == [("a", (1,), "<1>"), ("b", (9,), ""), ("a", (2, 3), "<2><3>"), ("a", (), "")]
    assert threads == {"loraplex-output"} and log == [("decode", 1), ("decode", 2), ("decode", 3)]


def test_a_failing_consumer_does_not_stop_the_others(caplog):
    seen = []

    def deliver(out):
        if out.request_id == "bad":
            raise RuntimeError("event loop is closed")
        seen.append(out.request_id)
    publisher = OutputPublisher(deliver)
    publisher.publish([delta("bad", [1]), delta("good", [2])], [])
    publisher.publish([delta("good", [3])], [])
    publisher.close()
    assert seen == ["good", "good"]
    assert "delivering a delta of request bad failed" in caplog.text


def test_the_engine_thread_waits_when_the_output_thread_falls_behind():
    release, delivered = threading.Event(), []

    def deliver(out):
        release.wait(10)
        delivered.append(out.request_id)
    publisher = OutputPublisher(deliver, max_steps=2)
    for i in range(3):  # one taken by the thread (blocked in deliver), two queued
        publisher.publish([delta(str(i), [i])], [])
    blocked = threading.Thread(target=publisher.publish, args=([delta("3", [3])], []))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the queue is full: publish waits
    release.set()
    blocked.join(10)
    publisher.close()
    assert delivered == ["0", "1", "2", "3"]


def test_a_steps_metrics_are_recorded_on_the_output_thread_before_its_deltas(caplog):
    seen = []

    def record():
        seen.append(("metrics", threading.current_thread().name))

    def broken():
        raise ValueError("bad metric")
    publisher = OutputPublisher(lambda out: seen.append(("delta", out.request_id)))
    publisher.publish([delta("a", [1])], [], before=record)
    publisher.publish([], [], before=record)  # a step with no deltas still records its metrics
    publisher.publish([delta("b", [2])], [], before=broken)
    publisher.close()
    assert seen == [("metrics", "loraplex-output"), ("delta", "a"), ("metrics", "loraplex-output"), ("delta", "b")]
    assert "recording a step's metrics failed" in caplog.text
