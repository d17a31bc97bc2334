"""response_format the tokenizer cannot write is a 400 before generation (structured_output.py).

The committed needle checkpoint's 20-word tokenizer has no '{': vLLM admitted json_object /
json_schema requests and ended them mid-generation with a 500. Real vLLM config, tokenizers
and xgrammar; no engine (the HTTP side: test_robustness.py, streamed requests refused with a 4xx).
"""

from __future__ import annotations

from pathlib import Path

import pytest

NEEDLE = Path(__file__).resolve().parents[1] / "assets" / "needle-video-llava"


@pytest.fixture(scope="module")
def vllm_side():
    from vllm.config import ModelConfig, StructuredOutputsConfig
    from vllm.tokenizers import get_tokenizer

    from intp_vllm.vllm_ext.plugin import register

    register()
    return ModelConfig(model=str(NEEDLE)), StructuredOutputsConfig(), get_tokenizer(str(NEEDLE))


def params(**constraint):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint))


@pytest.mark.parametrize("constraint, kind, opener", [
    ({"json_object": True}, "json_object", "'{'"),
    ({"json": {"type": "object", "properties": {"color": {"type": "string"}}}}, "json_schema", "'{'"),
    ({"json": '{"type": "array", "items": {"type": "integer"}}'}, "json_schema", "'\\['"),
])
def test_json_the_tokenizer_cannot_begin_is_refused_by_vllm_s_own_request_check(vllm_side, constraint, kind, opener):
    from vllm.exceptions import VLLMValidationError

    model_config, structured_config, tokenizer = vllm_side
    with pytest.raises(VLLMValidationError, match=rf"^response_format {kind} cannot be served by this model: no token "
                       rf"of its tokenizer \(20 tokens\) can begin the JSON .* no token starting with {opener}\)"):
        params(**constraint).verify(model_config, None, structured_config, tokenizer)


def test_other_constraints_and_plain_requests_pass(vllm_side):
    """Constraints other than JSON are vLLM's to judge; without structured_outputs nothing is checked."""
    from vllm import SamplingParams

    model_config, structured_config, tokenizer = vllm_side
    params(choice=["red", "green"]).verify(model_config, None, structured_config, tokenizer)
    SamplingParams(max_tokens=4).verify(model_config, None, structured_config, tokenizer)


def test_a_tokenizer_that_can_write_json_passes(tmp_path):
    """Negative control: the same check with a byte-level tokenizer finds '{' among the first tokens."""
    import xgrammar as xgr
    from transformers import AutoTokenizer
    from vllm.sampling_params import StructuredOutputsParams

    from intp_vllm.research.tiny_model import build_tokenizer
    from intp_vllm.vllm_ext.structured_output import check_json_expressible, first_tokens

    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    check_json_expressible(StructuredOutputsParams(json_object=True), tokenizer, len(tokenizer))
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    first = first_tokens(compiler.compile_json_schema('{"type": "object"}'), len(tokenizer))
    assert [tokenizer.convert_ids_to_tokens(i) for i in first] == ["{"]
    needle = AutoTokenizer.from_pretrained(NEEDLE)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(needle, vocab_size=len(needle)))
    assert first_tokens(compiler.compile_json_schema('{"type": "object"}'), len(needle)) == []
