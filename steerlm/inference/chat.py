"""The chat CLI: a conversation with a steerable model on the terminal, its attributes changed live.

Each reply streams as it is generated. Lines starting with `/` are commands (`/help`); everything else
is the user's next turn. A bad command or value prints an error and the conversation goes on. The
session reads lines from any iterable and writes to any text stream, so tests feed it a list.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from steerlm.config.inference import ChatConfig, SamplingDefaults
from steerlm.data.attributes import Labels
from steerlm.data.records import Role, Turn
from steerlm.inference.engine import Batching, GenerationJob, Service, serving
from steerlm.inference.steering import RequestError, ResponseText, sampling_params

HELP = """commands:
  /set NAME VALUE   steer the next replies (e.g. /set humor 3); several at once as an attribute
                    string: /set humor:3,verbosity:1
  /unset NAME       leave an attribute out of the attribute string
  /show             attributes, system prompt and the number of turns so far
  /system TEXT      replace the system prompt (/system alone clears it)
  /reset            start over: no turns, the configured attributes and system prompt
  /help             this text
  /quit             leave (Ctrl-D too)"""


class ChatSession:
    def __init__(self, service: Service, sampling: SamplingDefaults, out: TextIO) -> None:
        self.engine, self.steering, self.sampling, self.out = service.engine, service.steering, sampling, out
        self.reset()

    def reset(self) -> None:
        self.attributes: Labels = dict(self.steering.defaults)
        self.system = self.steering.system_prompt
        self.turns: list[Turn] = []

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def banner(self, model: str) -> None:
        schema = self.steering.schema
        self._say(
            f"steerlm chat with {model}: schema '{schema.name}' ({', '.join(schema.attributes)}; "
            f"{schema.min_value:g} to {schema.max_value:g}). /help for commands."
        )
        self.show()

    def show(self) -> None:
        unset = [name for name in self.steering.schema.attributes if name not in self.attributes]
        untrained = self.steering.untrained(self.attributes)
        self._say(
            f"attributes: {self.steering.schema.format(self.attributes) or '(none)'}"
            + (f"  unset: {', '.join(unset)}" if unset else "")
            + (f"  never trained: {', '.join(untrained)}" if untrained else "")
        )
        self._say(f"system: {self.system!r}  turns: {len(self.turns)}")

    def run(self, lines: Iterable[str]) -> None:
        for line in lines:
            if not self.handle(line.rstrip("\n")):
                return

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user leaves."""
        if not line.strip():
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        command, _, rest = line[1:].partition(" ")
        try:
            return self._command(command, rest.strip())
        except RequestError as error:
            self._say(f"error: {error.message}")
            return True

    def _command(self, command: str, rest: str) -> bool:
        if command in ("quit", "exit"):
            return False
        if command == "set" and ":" in rest:  # an attribute string, as NeMo-Aligner's clients write the line
            self.attributes = self.steering.labels(rest, base=self.attributes) or {}
            self.show()
        elif command in ("set", "unset"):
            name, _, value = rest.partition(" ")
            if not name or (command == "set") != bool(value.strip()):
                raise RequestError(None, "usage: /set NAME VALUE, /set NAME:VALUE,NAME:VALUE or /unset NAME")
            try:
                number = float(value) if command == "set" else None
            except ValueError:
                raise RequestError(None, f"{value.strip()!r} is not a number") from None
            self.attributes = self.steering.labels({name: number}, base=self.attributes) or {}
            self.show()
        elif command == "show":
            self.show()
        elif command == "system":
            self.system = rest
            self.show()
        elif command == "reset":
            self.reset()
            self.show()
        elif command == "help":
            self._say(HELP)
        else:
            raise RequestError(None, f"unknown command /{command}; /help lists the commands")
        return True

    def reply(self, text: str) -> None:
        """Stream the model's answer to `text` and add both turns; on an error or Ctrl-C add neither."""
        labels = self.attributes or None
        turns = [*self.turns, Turn(Role.user, text)]
        try:
            prompt = self.steering.prompt_ids(self.system, turns, labels)
        except RequestError as error:
            self._say(f"error: {error.message}")
            return
        events: queue.Queue = queue.Queue()
        job = GenerationJob(sink=events.put, route="cli", prompts=[prompt], params=sampling_params(self.sampling))
        self.engine.submit(job)
        response = ResponseText(self.steering.template.config.turn_suffix)
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    self._say(f"\nerror: {event}")
                    return
                for delta in event:
                    self.out.write(response.push(delta))
                self.out.flush()
        except KeyboardInterrupt:
            job.cancel()
            self._say("\n[interrupted: this turn is not kept]")
            return
        self._say("")
        self.turns = [*turns, Turn(Role.assistant, response.text, labels)]


def terminal_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed at the terminal (with line editing where readline exists) until Ctrl-D or Ctrl-C."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() history and editing
        except ImportError:
            pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            return


def chat(cfg: ChatConfig, lines: Iterable[str] | None = None, out: TextIO = sys.stdout) -> None:
    """Load the model and chat until /quit or end of input; under TP rank 0 chats and the others follow."""
    with serving(cfg, Batching(max_batch_size=1, max_queue=1, request_timeout_s=None)) as service:
        if service is None:
            return
        session = ChatSession(service, cfg.sampling, out)
        session.banner(str(service.model.path))
        session.run(terminal_lines() if lines is None else lines)
