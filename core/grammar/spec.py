"""What a request asks its output to follow, and the one error a bad grammar raises.

TGI's `parameters.grammar` is `{"type": "json", "value": <schema object or its text>}` or
`{"type": "regex", "value": "<pattern>"}`; OpenAI's `response_format` carries a schema the same way.
The API turns each into a `GrammarSpec`, the compile cache's key: equal text, one compile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from tgserve.core.errors import RequestRejected

GRAMMAR_KINDS = ("json", "regex")


class GrammarError(RequestRejected):
    """The grammar cannot be served: invalid or unsupported schema, invalid regex, or a compile that ran
    past its time limit. A `RequestRejected`, so the API answers it as TGI's 422 `validation` error;
    the message names the problem and is what the client reads."""


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    kind: str  # "json" (text is a JSON schema) or "regex" (text must match the whole output)
    text: str  # the schema's JSON text or the pattern, exactly as compiled and as cached

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar type must be one of {', '.join(GRAMMAR_KINDS)}, got '{self.kind}'")
        if not isinstance(self.text, str):
            raise GrammarError(f"a {self.kind} grammar's value must be text, got {type(self.text).__name__}")

    @classmethod
    def json_schema(cls, schema: object) -> GrammarSpec:
        """A JSON-schema grammar from a parsed schema (dict, or True/False) or its text.

        A parsed schema is serialized with its key order kept: property order is the order the
        output's properties follow. Text is checked to be JSON here, so the error names that first.
        """
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except json.JSONDecodeError as error:
                raise GrammarError(f"the JSON schema is not valid JSON: {error}") from None
        else:
            parsed = schema
        if not isinstance(parsed, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(parsed).__name__}")
        text = schema if isinstance(schema, str) else json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
        return cls("json", text)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        """A regex grammar: the whole output must match `pattern`."""
        return cls("regex", pattern)
