"""EngineLoop hands a step's deltas to its output thread as the next step's forward starts."""

import torch

from helpers import dummy_engine_factory
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.request import Prompt, SamplingParams


def test_deltas_wait_for_the_next_forward_and_none_wait_once_idle(tmp_path):
    engine = dummy_engine_factory(tmp_path, torch.device("cpu"))()
    events = []  # appended on the engine thread only: its order is the order things happened
    schedule, forward = engine.scheduler.schedule, engine.runner.forward_logits

    def scheduled():
        events.append("schedule")
        return schedule()

    def forwarded(packed):
        events.append("forward")
        return forward(packed)
    engine.scheduler.schedule, engine.runner.forward_logits = scheduled, forwarded
    loop = EngineLoop(engine).start()
    publish = loop._publisher.publish

    def published(outputs, undecoded, before=None):
        events.append(("publish", len(outputs), len(undecoded)))
        publish(outputs, undecoded, before)
    loop._publisher.publish = published
    try:
        stream = loop.submit(Prompt(token_ids=(5, 6, 7)), SamplingParams(max_new_tokens=3, ignore_eos=True))
        result = stream.result()
    finally:
        loop.stop()
    assert result.finished and len(result.token_ids) == 3 and result.text
    one = ("publish", 1, 1)  # one delta, its text to decode on the output thread
    # step 1's delta is handed over once step 2 has scheduled and packed, as its forward starts;
    # after the last step nothing follows, so its delta goes at once
    assert events == ["schedule", "forward", "schedule", one, "forward", "schedule", one, "forward", one]
