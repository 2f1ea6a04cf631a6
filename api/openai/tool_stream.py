"""A streamed tool answer -> OpenAI's tool-call deltas, as the text arrives.

The answer is `{"name": "<function>", "arguments": {...}}` (`tools`), name first: once the text holds
the whole name, the first delta announces the call (`id`, `type`, `function.name`, empty
`arguments`); every later piece of the arguments object follows as an `arguments` fragment, and the
fragments add up to the arguments' JSON text. The closing brace of the outer object is held back
(with any brace or space that may be it) until more text shows it is not the last. A `no_tool` answer
streams its `content` string instead, decoded from JSON as far as it is complete. Text that never
becomes a call (a generation cut short before the name) is sent as content at the end, as the
non-streamed answer reads it (`tools.read_answer`).
"""
from __future__ import annotations

import json
import re

from tgserve.api.openai.tools import NO_TOOL

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_CONTENT_HEAD = re.compile(r'\s*\{\s*"content"\s*:\s*"')
_HELD_BACK = " \t\r\n}"  # characters at the end of the text that may close the outer object


class ToolStream:
    """Feed it the answer's text piece by piece; it returns the `delta` objects to send."""

    def __init__(self, call_id: str):
        self.call_id = call_id
        self.text = ""  # the answer so far
        self.name: str | None = None  # the called function, once its name is complete
        self._arguments_at = 0  # where the arguments start in `text`
        self._num_sent = 0  # characters of the arguments' text (or of the decoded content) sent

    def feed(self, piece: str) -> list[dict]:
        """The deltas `piece` (the next text of the answer) completes."""
        self.text += piece
        deltas = []
        if self.name is None:
            head = _HEAD.match(self.text)
            if head is None:
                return deltas
            self.name, self._arguments_at = json.loads(f'"{head.group(1)}"'), head.end()
            if self.name != NO_TOOL:
                deltas.append(self._call_delta(name=self.name, arguments=""))
        if self.name == NO_TOOL:
            return deltas + self._content_deltas(is_final=False)
        arguments = self.text[self._arguments_at:]
        return deltas + self._argument_deltas(arguments[:len(arguments.rstrip(_HELD_BACK))])

    def finish(self) -> list[dict]:
        """The deltas still held back once the answer is complete (or cut short)."""
        if self.name is None:
            return [{"role": "assistant", "content": self.text}] if self.text else []
        if self.name == NO_TOOL:
            return self._content_deltas(is_final=True)
        arguments = self.text[self._arguments_at:].rstrip()
        return self._argument_deltas(arguments[:-1] if arguments.endswith("}") else arguments)

    @property
    def is_call(self) -> bool:
        """Whether the answer is a function call (its name complete and not `no_tool`)."""
        return self.name is not None and self.name != NO_TOOL

    def _call_delta(self, **function: str) -> dict:
        call = {"index": 0, "function": function}
        if "name" in function:
            call = {"index": 0, "id": self.call_id, "type": "function", "function": function}
        return {"role": "assistant", "tool_calls": [call]}

    def _argument_deltas(self, sendable: str) -> list[dict]:
        fragment, self._num_sent = sendable[self._num_sent:], max(self._num_sent, len(sendable))
        return [self._call_delta(arguments=fragment)] if fragment else []

    def _content_deltas(self, is_final: bool) -> list[dict]:
        arguments = self.text[self._arguments_at:]
        head = _CONTENT_HEAD.match(arguments)
        if head is None:
            return []
        decoded = _decoded_prefix(arguments[head.end():])
        fragment, self._num_sent = decoded[self._num_sent:], max(self._num_sent, len(decoded))
        return [{"role": "assistant", "content": fragment}] if fragment else []


def _decoded_prefix(body: str) -> str:
    """The text of a JSON string whose body (after the opening quote) starts `body`, as far as it is
    complete: up to its closing quote, or short of an escape still being written."""
    end, index = len(body), 0
    while index < len(body):
        char = body[index]
        if char == '"':
            end = index
            break
        if char == "\\":
            width = 6 if body[index + 1:index + 2] == "u" else 2
            if index + width > len(body):
                end = index
                break
            index += width
            continue
        index += 1
    text = json.loads(f'"{body[:end]}"')
    if text and "\ud800" <= text[-1] <= "\udbff":  # half a surrogate pair: its other half is still to come
        text = text[:-1]
    return text
