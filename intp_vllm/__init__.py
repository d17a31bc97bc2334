"""intp-vllm: Video-LLaVA on vLLM, extended to long videos without training (INTP)."""

__version__ = "0.1.0"
