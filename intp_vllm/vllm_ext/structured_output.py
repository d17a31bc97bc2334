"""Structured-output requests this model's tokenizer cannot serve are a 400, before generation.

`response_format` `json_object` / `json_schema` constrain every generated token to the JSON
grammar. With a tokenizer that has no token able to begin the JSON value (the committed
needle checkpoints' 20-word vocabulary has no `{`), vLLM admits the request, the grammar
masks every token, the sampler picks a token the grammar then rejects, and the engine ends
the request: a 500 "Internal server error" (streamed: a 200, then an error event).

`checked_verify` wraps vLLM's `SamplingParams.verify` (it runs in the API server, with the
request's tokenizer, before the request reaches the engine) for this plugin's models: after
vLLM's own checks, the JSON grammar is compiled with xgrammar (vLLM's default backend) for
the tokenizer, and if no token may come first a `VLLMValidationError` (a 400) names the
constraint and the reason. A grammar the tokenizer can begin but not finish is not detected
(that would take a search over token sequences). Other constraints (regex, choice, grammar,
structural tags) and schemas xgrammar cannot compile are left to vLLM.
"""

from __future__ import annotations

import functools
import json

MAX_TOKENIZERS = 4
"""Tokenizers whose xgrammar compiler is kept (one a served model)."""


def checked_verify(verify):
    """Wrap `SamplingParams.verify(model_config, speculative_config, structured_outputs_config,
    tokenizer)`: vLLM's checks, then `check_json_expressible` for a model served by this plugin."""
    from intp_vllm.vllm_ext.plugin import MODEL_CLASSES

    @functools.wraps(verify)
    def wrapper(self, model_config, speculative_config, structured_outputs_config, tokenizer, *args, **kwargs):
        verify(self, model_config, speculative_config, structured_outputs_config, tokenizer, *args, **kwargs)
        ours = set(getattr(model_config.hf_config, "architectures", None) or ()) & set(MODEL_CLASSES)
        if ours and structured_outputs_config is not None and self.structured_outputs is not None:
            check_json_expressible(self.structured_outputs, tokenizer, model_config.get_vocab_size())

    wrapper.intp_vllm_wrapped = True
    return wrapper


def check_json_expressible(constraint, tokenizer, vocab_size: int) -> None:
    """Raise VLLMValidationError if `constraint` (vLLM's StructuredOutputsParams) asks for JSON
    (`json_object`, or `json`: a schema) and no token of `tokenizer` (an HF tokenizer; its
    first `vocab_size` ids) can begin it. Anything else, or a schema xgrammar cannot compile
    (vLLM decides about those), passes."""
    from intp_vllm.vllm_ext.internals import VLLMValidationError

    if constraint.json_object:
        kind, schema = "json_object", '{"type": "object"}'
    elif constraint.json is not None:
        kind = "json_schema"
        schema = constraint.json if isinstance(constraint.json, str) else json.dumps(constraint.json)
    else:
        return
    compiler = _compiler(tokenizer, vocab_size)
    if compiler is None:
        return
    try:
        grammar = compiler.compile_json_schema(schema, any_whitespace=not constraint.disable_any_whitespace)
    except Exception:  # noqa: BLE001 (xgrammar's errors vary by version; vLLM reports bad schemas itself)
        return
    if not first_tokens(grammar, vocab_size):
        raise VLLMValidationError(
            f"response_format {kind} cannot be served by this model: no token of its tokenizer "
            f"({vocab_size} tokens) can begin the JSON the constraint asks for (it has no token starting "
            f"with {_openers(schema)}), so every token would be masked; drop response_format, or serve a "
            "checkpoint whose tokenizer can write JSON", parameter="response_format")


def first_tokens(grammar, vocab_size: int) -> list[int]:
    """The token ids an xgrammar CompiledGrammar allows first."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    words = bitmask[0].tolist()
    return [i for i in range(vocab_size) if (words[i // 32] >> (i % 32)) & 1]


@functools.lru_cache(maxsize=MAX_TOKENIZERS)
def _compiler_for(tokenizer, vocab_size: int):
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))


def _compiler(tokenizer, vocab_size: int):
    """An xgrammar compiler for an HF tokenizer (cached), or None for one xgrammar cannot read."""
    try:
        return _compiler_for(tokenizer, vocab_size)
    except Exception:  # noqa: BLE001 (not an HF tokenizer, e.g. Mistral's: left to vLLM)
        return None


def _openers(schema: str) -> str:
    """What a JSON value of `schema` begins with, in words."""
    try:
        kind = json.loads(schema).get("type")
    except (ValueError, AttributeError):
        kind = None
    return {"object": "'{'", "array": "'['", "string": "'\"'"}.get(kind, "'{', '[', '\"', a digit or a letter of "
                                                                           "true/false/null")
