"""The two committed adapters trained on the default model behave as trained, in one shared batch.

`upper` (r=8, all 7 modules) answers in capitals; `json` (r=16, q/v/o/down) answers as a JSON
object. Both run beside base-model rows in the same continuous batch; the held-out prompts were
never seen in training (scripts/train_demo_adapters.py).
"""

from __future__ import annotations

import json

from helpers import ASSETS, run_to_completion
from loraplex_server.engine.request import ChatMessage, Prompt, SamplingParams

HELD_OUT = ["What is the capital of Italy?", "Name a fruit that is red.", "How many hours are in a day?",
            "What do cows eat?", "Describe a tree in one sentence.", "How do fish breathe?"]
MAX_NEW = 40


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except json.JSONDecodeError:
        return False


def test_trained_adapters_change_greedy_output_the_trained_way(make_engine):
    engine = make_engine(max_loras=2, max_rank=16)
    for name in ("upper", "json"):
        engine.lora.add_adapter(name, ASSETS / "adapters" / name)
    for i, prompt in enumerate(HELD_OUT):
        for adapter in (None, "upper", "json"):
            engine.add_request(engine.make_request(
                Prompt(messages=(ChatMessage("user", prompt),)), SamplingParams(max_new_tokens=MAX_NEW),
                adapter, f"{adapter or 'base'}-{i}"))
    outputs = run_to_completion(engine)
    text = {rid: "".join(d.text for d in deltas) for rid, deltas in outputs.items()}
    n = len(HELD_OUT)
    base_upper = sum(upper_share(text[f"base-{i}"]) for i in range(n)) / n
    tuned_upper = sum(upper_share(text[f"upper-{i}"]) for i in range(n)) / n
    assert base_upper < 0.2 < 0.8 < tuned_upper, (base_upper, tuned_upper)
    base_json = sum(parses_as_object(text[f"base-{i}"]) for i in range(n))
    json_objects = sum(parses_as_object(text[f"json-{i}"]) for i in range(n))
    assert base_json == 0 and json_objects >= n - 1, [text[f"json-{i}"] for i in range(n)]
    assert all(text[f"json-{i}"].startswith('{"answer": "') for i in range(n))
