"""CLI tests: ``loraplex.cli.main`` against the fake in-process server (fake_loraplex_server.py)."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2

from fake_loraplex_server import STREAM_PIECES
from loraplex.cli import main


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LORAPLEX_TARGET", raising=False)
    monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)


def run(fake, *argv: str) -> int:
    return main(["--target", fake.target, *argv])


class RecordingStdout(io.StringIO):
    """Records the order of writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return super().write(text)

    def flush(self) -> None:
        self.events.append(("flush", ""))


# ---------------------------------------------------------------- generate


def test_generate_streams_text(fake, capsys):
    assert run(fake, "generate", "Hi there") == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(STREAM_PIECES) + "\n"
    assert captured.err == ""
    call, = fake.calls_of("GenerateStream")
    assert call.request.prompt == "Hi there" and fake.calls_of("Generate") == []


def test_generate_flushes_each_chunk(fake, monkeypatch):
    out = RecordingStdout()
    monkeypatch.setattr("sys.stdout", out)
    assert run(fake, "generate", "Hi") == 0
    expected = []
    for piece in STREAM_PIECES:
        expected += [("write", piece), ("flush", "")]
    assert out.events == expected + [("write", "\n"), ("flush", "")]


def test_generate_forwards_options(fake, capsys):
    assert run(fake, "generate", "Hi", "--adapter", "upper", "--max-new-tokens", "5",
               "--temperature", "0.5", "--top-p", "0.75", "--top-k", "4", "--seed", "7",
               "--repetition-penalty", "1.25", "--stop", "x", "y", "--stop", "z",
               "--ignore-eos") == 0
    request = fake.calls_of("GenerateStream")[0].request
    s = request.sampling
    assert request.adapter_id == "upper"
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.5, 0.75, 4, 7)
    assert s.repetition_penalty == 1.25 and list(s.stop) == ["x", "y", "z"] and s.ignore_eos


def test_generate_leaves_unset_options_unset(fake, capsys):
    assert run(fake, "generate", "Hi") == 0
    sampling = fake.calls_of("GenerateStream")[0].request.sampling
    assert not sampling.HasField("seed") and sampling.max_new_tokens == 0
    assert list(sampling.stop) == [] and fake.calls_of("GenerateStream")[0].request.adapter_id == ""


def test_generate_no_stream(fake, capsys):
    assert run(fake, "generate", "Hi", "--no-stream") == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert len(fake.calls_of("Generate")) == 1 and fake.calls_of("GenerateStream") == []


def test_generate_json(fake, capsys):
    assert run(fake, "generate", "Hi", "--json", "--adapter", "json", "--logprobs", "2") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {
        "text": "Hello world", "token_ids": [10, 11, 12], "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3}, "adapter_id": "json",
        "request_id": "srv-1",
        "logprobs": [{"token_id": 10, "logprob": -0.5, "top": [[10, -0.5], [99, -1.25]]}],
    }
    assert fake.calls_of("Generate")[0].request.sampling.logprobs == 2


ENDED_AT_ONCE = "loraplex: the completion ended at once, with no text (finish reason: eos, 1 token)"


@pytest.mark.parametrize("mode", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_generate_that_ends_at_once_says_so_on_stderr(fake, capsys, mode):
    fake.ends_at_once = True  # what an instruct model does with a raw prompt: EOS first
    assert run(fake, "generate", "Name a fruit that is red.", "--adapter", "upper", *mode) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n"
    assert captured.err == (f"{ENDED_AT_ONCE}; an instruct model often needs chat: try "
                            "loraplex chat --adapter upper --message 'Name a fruit that is red.'\n")


def test_ended_at_once_hint_shortens_a_long_prompt_and_json_stays_quiet(fake, capsys):
    fake.ends_at_once = True
    assert run(fake, "generate", "x" * 61) == 0
    assert capsys.readouterr().err.endswith("try loraplex chat --message ...\n")
    assert run(fake, "generate", "Hi", "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["finish_reason"] == "eos" and captured.err == ""


@pytest.mark.parametrize("mode", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_a_completion_with_text_gets_no_notice(fake, capsys, mode):
    assert run(fake, "generate", "Hi", *mode) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "Hello world" and captured.err == ""


def test_chat_reply_that_ends_at_once_says_so_on_stderr(fake, capsys):
    fake.ends_at_once = True
    assert run(fake, "chat", "--message", "hello") == 0
    captured = capsys.readouterr()
    assert captured.out == "\n" and captured.err == ENDED_AT_ONCE + "\n"


@pytest.mark.parametrize("argv", [["generate", "x", "--max-new-tokens", "0"],
                                  ["generate", "x", "--seed", "-1"], ["generate"], [],
                                  ["adapters"], ["--timeout", "0", "info"]])
def test_usage_errors_exit_2(fake, capsys, argv):
    assert run(fake, *argv) == 2
    assert "usage:" in capsys.readouterr().err
    assert fake.calls == []


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "loraplex 0.1.0"


# ---------------------------------------------------------------- chat


def test_chat_single_message(fake, capsys):
    assert run(fake, "chat", "--system", "be brief", "--message", "hello", "--adapter", "upper") == 0
    assert capsys.readouterr().out == "Hello world\n"
    request = fake.calls_of("GenerateStream")[0].request
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "be brief"), ("user", "hello")]
    assert request.adapter_id == "upper"


def test_chat_loop_keeps_history_until_eof(fake, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\n  \nsecond question\n"))
    assert run(fake, "chat") == 0
    assert capsys.readouterr().out == "Hello world\nHello world\n"
    first, second = (call.request for call in fake.calls_of("GenerateStream"))
    assert [(m.role, m.content) for m in first.messages.messages] == [("user", "first question")]
    assert [(m.role, m.content) for m in second.messages.messages] == [
        ("user", "first question"), ("assistant", "Hello world"), ("user", "second question")]


def test_chat_loop_with_empty_stdin_sends_nothing(fake, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert run(fake, "chat") == 0
    assert fake.calls == [] and capsys.readouterr().out == ""


# ---------------------------------------------------------------- adapters, info, health


def test_adapters_list_table(fake, capsys):
    assert run(fake, "adapters", "list") == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID     STATE   RANK  PINNED  REQUESTS  TARGETS",
        "upper  device  8     yes     12        q_proj,v_proj",
        "json   disk    16    no      0         o_proj",
    ]


def test_adapters_list_json_and_empty(fake, capsys):
    assert run(fake, "adapters", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["adapter_id"] for a in listed] == ["upper", "json"]
    assert listed[0] == {"adapter_id": "upper", "rank": 8, "target_modules": ["q_proj", "v_proj"],
                         "state": "device", "pinned": True, "request_count": 12,
                         "source": "upper", "size_bytes": 1024, "version": 0, "last_used_unix": 0.0,
                         "load_latency_s": 0.0, "owner": "", "error": "", "load_attempts": 0,
                         "retrying": False, "content_sha256": "", "source_bytes": 0, "source_mtime_unix": 0.0}
    fake.adapters.clear()
    assert run(fake, "adapters", "list") == 0
    assert capsys.readouterr().out == "no adapters registered\n"


def test_adapters_load_and_unload(fake, capsys):
    assert run(fake, "adapters", "load", "new", "adapters/new", "--pin") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "STATE", "RANK", "PINNED", "REQUESTS", "TARGETS"]
    assert out[1].split() == ["new", "cpu", "4", "yes", "0", "q_proj"]
    request = fake.calls_of("LoadAdapter")[0].request
    assert (request.adapter_id, request.source, request.pin) == ("new", "adapters/new", True)
    assert run(fake, "adapters", "unload", "new") == 0
    assert capsys.readouterr().out == "unloaded new\n"
    assert "new" not in fake.adapters


def test_info(fake, capsys):
    assert run(fake, "info") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model:", "SmolLM2-135M"]
    assert dict(line.split(":", 1) for line in lines)["kv_cache_tokens"].strip() == "8192"
    assert len(lines) == 14  # every ServerInfo field
    assert run(fake, "info", "--json") == 0
    assert json.loads(capsys.readouterr().out)["max_lora_rank"] == 64


def test_health_exit_codes(fake, capsys):
    assert run(fake, "health") == 0
    assert capsys.readouterr().out == "SERVING\n"
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run(fake, "health") == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert run(fake, "health", "--service", "loraplex.v1.LoraplexService") == 0


# ---------------------------------------------------------------- errors and environment


def test_not_found_exits_2(fake, capsys):
    assert run(fake, "adapters", "unload", "nope") == 2
    captured = capsys.readouterr()
    assert captured.err == "error: NOT_FOUND: adapter 'nope' not found\n"
    assert captured.out == ""


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL])
def test_other_errors_exit_2(fake, capsys, code):
    fake.fail("GenerateStream", code, details="nope")
    assert run(fake, "generate", "x") == 2
    assert capsys.readouterr().err == f"error: {code.name}: nope\n"


def test_unavailable_exits_3(dead_target, capsys):
    assert main(["--target", dead_target, "generate", "x"]) == 3
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_timeout_option(fake, capsys):
    fake.delay = 3.0
    assert run(fake, "--timeout", "0.2", "generate", "x", "--no-stream") == 2
    assert capsys.readouterr().err.startswith("error: DEADLINE_EXCEEDED: ")


def test_error_midstream_ends_the_line(fake, capsys):
    from fake_loraplex_server import Failure

    fake.stream_abort_after = (2, Failure(grpc.StatusCode.ABORTED, "preempted"))
    assert run(fake, "generate", "x") == 2
    captured = capsys.readouterr()
    assert captured.out == "Hello\n"
    assert captured.err == "error: ABORTED: preempted\n"


def test_environment_supplies_target_and_api_key(fake, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TARGET", fake.target)
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    assert main(["info"]) == 0
    assert fake.calls[-1].metadata["authorization"] == "Bearer from-env"
    assert main(["--api-key", "flag", "adapters", "list"]) == 0
    assert fake.calls[-1].metadata["authorization"] == "Bearer flag"


def test_target_flag_overrides_environment(fake, dead_target, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TARGET", dead_target)
    assert main(["--target", fake.target, "health"]) == 0
    monkeypatch.setenv("LORAPLEX_TARGET", fake.target)
    assert main(["health"]) == 0
    assert fake.health.checks == 2
