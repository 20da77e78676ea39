"""The ``loraplex`` command line: generate, chat, manage adapters, query the server.

    loraplex [--target HOST:PORT] [--api-key KEY] [--timeout S] COMMAND ...

``--target`` defaults to ``$LORAPLEX_TARGET`` (else ``localhost:50051``) and ``--api-key`` to
``$LORAPLEX_API_KEY``. Exit codes: 0 ok, 1 health not SERVING, 2 a failed call (or bad usage),
3 server unavailable, 130 interrupted. A completion that ends with no text gets a notice on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from loraplex._bench_cli import add_bench_parser
from loraplex._version import __version__
from loraplex.client import DEFAULT_TARGET, Client
from loraplex.errors import LoraplexError
from loraplex.types import AdapterInfo, ChatMessage, StreamChunk, Usage

EXIT_OK = 0
EXIT_NOT_SERVING = 1
EXIT_ERROR = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

TARGET_ENV = "LORAPLEX_TARGET"
API_KEY_ENV = "LORAPLEX_API_KEY"


@dataclass(frozen=True)
class Streams:
    """Where a command reads and writes (the process streams, resolved when ``main`` runs)."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO


Handler = Callable[[Client, argparse.Namespace, Streams], int]


# ---------------------------------------------------------------- argument types and parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _file_text(path: str) -> str:
    """An argument naming a file, read now (a missing file is a usage error)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None


def _sampling_parent() -> argparse.ArgumentParser:
    """Options shared by ``generate`` and ``chat``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("generation")
    group.add_argument("--adapter", default="", metavar="ID", help="adapter id (default: base model)")
    group.add_argument("--max-new-tokens", type=_positive_int, metavar="N")
    group.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    group.add_argument("--top-p", type=float, metavar="P")
    group.add_argument("--top-k", type=_non_negative_int, metavar="K")
    group.add_argument("--repetition-penalty", type=float, metavar="R")
    group.add_argument("--seed", type=_non_negative_int)
    group.add_argument("--stop", action="extend", nargs="+", default=[], metavar="S",
                       help="stop string(s); repeatable")
    group.add_argument("--ignore-eos", action="store_true")
    constraint = parent.add_argument_group("structured output (at most one)").add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", type=_file_text, metavar="FILE", help="the output is JSON valid against "
                            "the JSON Schema in FILE")
    constraint.add_argument("--regex", metavar="RE", help="the whole output matches this regular expression")
    constraint.add_argument("--choice", nargs="+", metavar="S", help="the output is exactly one of these strings")
    constraint.add_argument("--grammar", type=_file_text, metavar="FILE", help="the output follows the EBNF grammar "
                            "in FILE (with a root rule)")
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    return parent


def _add_generate(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[parent], help="complete a prompt (streamed)")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--logprobs", type=_non_negative_int, default=0, metavar="N",
                   help="top-N logprobs per token (shown with --json)")
    p.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    p.set_defaults(handler=cmd_generate)


def _add_chat(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[parent],
                       help="chat: one --message, or user lines from stdin until EOF")
    p.add_argument("--system", metavar="S", help="system prompt")
    p.add_argument("--message", metavar="M", help="send one user turn and exit")
    p.set_defaults(handler=cmd_chat)


def _add_adapters(sub: Any) -> None:
    p = sub.add_parser("adapters", help="list, load or unload adapters")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="list registered adapters")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_adapters_list)
    load = actions.add_parser("load", help="register (or replace) an adapter")
    load.add_argument("adapter_id", metavar="ID")
    load.add_argument("source", metavar="SOURCE", help="directory under the server's adapter root")
    load.add_argument("--pin", action="store_true", help="keep it in a device slot")
    load.add_argument("--json", action="store_true")
    load.set_defaults(handler=cmd_adapters_load)
    unload = actions.add_parser("unload", help="unregister an adapter")
    unload.add_argument("adapter_id", metavar="ID")
    unload.set_defaults(handler=cmd_adapters_unload)


def build_parser(default_target: str = DEFAULT_TARGET,
                 default_api_key: str | None = None) -> argparse.ArgumentParser:
    """The ``loraplex`` argument parser (defaults are passed in; the environment is read by ``main``)."""
    parser = argparse.ArgumentParser(prog="loraplex", description="Loraplex multi-LoRA server client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--target", default=default_target,
                        help=f"server address (env {TARGET_ENV}; default %(default)s)")
    parser.add_argument("--api-key", default=default_api_key, help=f"API key (env {API_KEY_ENV})")
    parser.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                        help="deadline of each call")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = _sampling_parent()
    _add_generate(sub, parent)
    _add_chat(sub, parent)
    _add_adapters(sub)
    add_bench_parser(sub)
    info = sub.add_parser("info", help="show the served model and limits")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)
    health = sub.add_parser("health", help="print the health status; exit 0 only if SERVING")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    health.set_defaults(handler=cmd_health)
    return parser


# ---------------------------------------------------------------- output helpers


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "adapter_id": args.adapter, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": args.stop or None, "ignore_eos": args.ignore_eos,
        "json_schema": args.json_schema, "regex": args.regex, "choice": args.choice, "grammar": args.grammar,
        "json_object": args.json_object,
    }


def _print_json(value: Any, out: TextIO) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    out.write(json.dumps(value, ensure_ascii=False) + "\n")


def write_stream(chunks: Iterable[StreamChunk], out: TextIO) -> tuple[str, StreamChunk | None]:
    """Write each chunk's text as it arrives (flushed), then a newline; return the whole text and the
    chunk that carried the finish reason (None if none did)."""
    parts: list[str] = []
    final: StreamChunk | None = None
    try:
        for chunk in chunks:
            if chunk.finish_reason is not None:
                final = chunk
            if chunk.text:
                out.write(chunk.text)
                out.flush()
                parts.append(chunk.text)
    except BaseException:
        if parts:  # end the partial line before the error is reported
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    return "".join(parts), final


def note_ended_at_once(text: str, finish_reason: str | None, usage: Usage | None, err: TextIO,
                       hint: str = "") -> None:
    """Say on ``err`` that a completion ended with no text (a finish reason given, empty text), so an
    empty answer is never silent; ``hint`` (a next step) is appended."""
    if text or finish_reason in (None, "", "unspecified"):
        return
    tokens = None if usage is None else usage.completion_tokens
    count = "" if tokens is None else f", {tokens} token{'' if tokens == 1 else 's'}"
    err.write(f"loraplex: the completion ended at once, with no text (finish reason: {finish_reason}{count})"
              f"{'; ' + hint if hint else ''}\n")


def chat_hint(args: argparse.Namespace) -> str:
    """The next step after a raw ``generate`` that ended at once: the same prompt as a chat turn."""
    command = ["loraplex", "chat", *(["--adapter", args.adapter] if args.adapter else []), "--message"]
    message = shlex.quote(args.prompt) if len(args.prompt) <= 60 else "..."
    return f"an instruct model often needs chat: try {shlex.join(command)} {message}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces (trailing spaces stripped)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


ADAPTER_HEADERS = ("ID", "STATE", "RANK", "PINNED", "REQUESTS", "TARGETS")


def adapter_row(info: AdapterInfo) -> tuple[str, ...]:
    """One table row for an adapter."""
    return (info.adapter_id, info.state, str(info.rank), "yes" if info.pinned else "no",
            str(info.request_count), ",".join(info.target_modules) or "-")


# ---------------------------------------------------------------- commands


def cmd_generate(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``generate PROMPT``: stream the completion, or print it whole (``--no-stream``, ``--json``).
    Without ``--json``, a completion that ended at once with no text gets a notice on stderr."""
    kwargs = _sampling_kwargs(args)
    if args.json:
        _print_json(client.generate(args.prompt, logprobs=args.logprobs, **kwargs), io.stdout)
    elif args.no_stream:
        result = client.generate(args.prompt, logprobs=args.logprobs, **kwargs)
        io.stdout.write(result.text + "\n")
        note_ended_at_once(result.text, result.finish_reason, result.usage, io.stderr, chat_hint(args))
    else:
        text, final = write_stream(client.generate_stream(args.prompt, logprobs=args.logprobs, **kwargs),
                                   io.stdout)
        if final is not None:
            note_ended_at_once(text, final.finish_reason, final.usage, io.stderr, chat_hint(args))
    return EXIT_OK


def _user_lines(io: Streams) -> Iterable[str]:
    """Non-blank lines from stdin until EOF, with a ``> `` prompt on stderr when interactive."""
    interactive = io.stdin.isatty()
    while True:
        if interactive:
            io.stderr.write("> ")
            io.stderr.flush()
        line = io.stdin.readline()
        if not line:
            if interactive:  # leave the terminal on a fresh line after Ctrl-D
                io.stderr.write("\n")
            return
        if line.strip():
            yield line.rstrip("\r\n")


def cmd_chat(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``chat``: one ``--message`` turn, or a loop over stdin lines keeping the conversation."""
    history = [ChatMessage("system", args.system)] if args.system else []
    turns = [args.message] if args.message is not None else _user_lines(io)
    kwargs = _sampling_kwargs(args)
    for text in turns:
        history.append(ChatMessage("user", text))
        reply, final = write_stream(client.generate_stream(messages=list(history), **kwargs), io.stdout)
        if final is not None:
            note_ended_at_once(reply, final.finish_reason, final.usage, io.stderr)
        history.append(ChatMessage("assistant", reply))
    return EXIT_OK


def cmd_adapters_list(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``adapters list``: a table (or ``--json``) of the registered adapters."""
    adapters = client.list_adapters()
    if args.json:
        _print_json([dataclasses.asdict(a) for a in adapters], io.stdout)
    elif not adapters:
        io.stdout.write("no adapters registered\n")
    else:
        io.stdout.write(format_table(ADAPTER_HEADERS, [adapter_row(a) for a in adapters]) + "\n")
    return EXIT_OK


def cmd_adapters_load(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``adapters load ID SOURCE``: register it and show what the server loaded."""
    info = client.load_adapter(args.adapter_id, args.source, pin=args.pin)
    if args.json:
        _print_json(info, io.stdout)
    else:
        io.stdout.write(format_table(ADAPTER_HEADERS, [adapter_row(info)]) + "\n")
    return EXIT_OK


def cmd_adapters_unload(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``adapters unload ID``."""
    client.unload_adapter(args.adapter_id)
    io.stdout.write(f"unloaded {args.adapter_id}\n")
    return EXIT_OK


def cmd_info(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``info``: the served model and limits as ``key: value`` lines (or ``--json``)."""
    info = client.server_info()
    if args.json:
        _print_json(info, io.stdout)
        return EXIT_OK
    fields = dataclasses.asdict(info)
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        io.stdout.write(f"{name + ':':<{width + 1}} {value}\n")
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace, io: Streams) -> int:
    """``health``: print the serving status; 0 if ``SERVING`` else 1."""
    status = client.health(args.service)
    io.stdout.write(status + "\n")
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


# ---------------------------------------------------------------- entry point


def _exit_code_of(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    return exc.code if isinstance(exc.code, int) else EXIT_ERROR


def _run(args: argparse.Namespace, io: Streams) -> int:
    handler: Handler = args.handler
    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            return handler(client, args, io)
    except LoraplexError as exc:
        io.stderr.write(f"error: {exc.code.name}: {exc.details}\n")
        return EXIT_UNAVAILABLE if exc.code == grpc.StatusCode.UNAVAILABLE else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser(default_target=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
                          default_api_key=os.environ.get(API_KEY_ENV) or None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return _exit_code_of(exc)
    io = Streams(stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    try:
        return _run(args, io)
    except KeyboardInterrupt:
        io.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        _discard_stdout()
        return EXIT_ERROR


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
