"""Model adapters on the INTP layer (`vllm_ext/model.py`): one file a model (docs/adapters.md)."""
