"""StructuredOutputsParams -> an xgrammar Grammar, refusing what the grammar could not enforce.

Building the Grammar checks the spec (schema, regex, EBNF, structural tag) without the tokenizer, in about a
millisecond, so a bad request is refused before it queues; compiling it against the vocabulary is the slow part
(StructuredOutputManager does that in a worker). xgrammar ignores JSON Schema keywords it does not implement (it
would let `not`, `uniqueItems` or `allOf` through unchecked), so schemas are first checked against the keywords it
enforces (each measured: a violating instance is rejected by the compiled grammar). JSON is compact (", " and ": ")
unless any_whitespace is set, in structural tags too.
"""
from __future__ import annotations

import functools
import json
import re

from mixquant.sampling_params import StructuredOutputsParams

# Consecutive whitespace characters JSON may hold between tokens with any_whitespace (xgrammar's
# max_whitespace_cnt): room for indented output, none for a model that would write newlines for ever.
MAX_JSON_WHITESPACE = 20

ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "unevaluatedProperties", "minProperties", "maxProperties", "items", "prefixItems",
    "unevaluatedItems", "minItems", "maxItems", "anyOf", "oneOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "discriminator",
})
ENFORCED_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "uuid", "uri", "uri-reference", "uri-template", "ipv4", "ipv6",
    "hostname", "json-pointer", "relative-json-pointer",
})
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames")


class UnenforceableSchema(ValueError):
    """A JSON schema with a keyword (or value) constrained decoding would not enforce."""


def check_json_schema(schema, path: str = "") -> None:
    """Raises UnenforceableSchema naming the first keyword, at its JSON pointer, that constrained decoding cannot
    enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnenforceableSchema(f"the schema at '{path or '/'}' must be an object or a boolean, got "
                                  f"{type(schema).__name__}")
    for keyword, value in schema.items():
        where = f"{path}/{keyword}"
        if keyword not in ENFORCED_KEYWORDS and keyword not in ANNOTATIONS and not keyword.startswith("x-"):
            raise UnenforceableSchema(f"the JSON schema keyword '{keyword}' (at '{where}') cannot be enforced by "
                                      f"constrained decoding; supported: {', '.join(sorted(ENFORCED_KEYWORDS))}")
        if keyword == "format" and value not in ENFORCED_FORMATS:
            raise UnenforceableSchema(f"the string format {value!r} (at '{where}') cannot be enforced by constrained "
                                      f"decoding; supported: {', '.join(sorted(ENFORCED_FORMATS))}")
        if keyword == "multipleOf" and schema.get("type") != "integer":
            raise UnenforceableSchema(f"multipleOf (at '{where}') is enforced for integers only")
        if keyword in SCHEMA_MAPS and isinstance(value, dict):
            for name, subschema in value.items():
                check_json_schema(subschema, f"{where}/{name}")
        elif keyword in SCHEMA_LISTS and isinstance(value, list):
            for i, subschema in enumerate(value):
                check_json_schema(subschema, f"{where}/{i}")
        elif keyword in SUBSCHEMAS:
            check_json_schema(value, where)


def compile_json_formats(node, whitespace: dict):
    """A copy of a structural tag whose JSON-schema formats are checked and turned into EBNF grammars under this
    request's whitespace rule (the structural tag's own json_schema format allows any whitespace)."""
    import xgrammar as xgr

    if isinstance(node, list):
        return [compile_json_formats(value, whitespace) for value in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json" and "json_schema" in node:
        check_json_schema(node["json_schema"])
        grammar = xgr.Grammar.from_json_schema(json.dumps(node["json_schema"]), **whitespace)
        return {"type": "grammar", "grammar": str(grammar)}
    return {key: compile_json_formats(value, whitespace) for key, value in node.items()}


def ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal (JSON's escapes are the ones xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


def _library_message(error: Exception) -> str:
    """xgrammar's message without its '[time] /path/file.cc:line: ' prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip())


def build_grammar(params: StructuredOutputsParams):
    """The Grammar of `params`; ValueError naming the problem if it is invalid or cannot be enforced."""
    return _build_grammar(params.key)


@functools.lru_cache(maxsize=256)
def _build_grammar(key: tuple):
    # cached by the spec's text, so a check the server made before queueing costs the engine nothing
    import xgrammar as xgr

    kind, text, any_whitespace = key
    value = json.loads(text)
    whitespace = dict(any_whitespace=any_whitespace, max_whitespace_cnt=MAX_JSON_WHITESPACE if any_whitespace else None)
    try:
        if kind == "json":
            check_json_schema(value)
            return xgr.Grammar.from_json_schema(text, **whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(ebnf_literal(choice) for choice in value))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(value)
        return xgr.Grammar.from_structural_tag(json.dumps(compile_json_formats(value, whitespace)))
    except UnenforceableSchema:
        raise
    except Exception as e:  # xgrammar says what is wrong in a RuntimeError (a structural tag: pydantic's error)
        raise ValueError(f"invalid {kind}: {_library_message(e)}") from e
