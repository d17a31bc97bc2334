"""The replica class of `intp-vllm serve --ray` (`LLMConfig.server_cls`, set by `ray_serve.ray_llm_config`).

Ray Serve LLM 2.60's `LLMServer` does not stop its vLLM engine when Serve stops the replica:
Serve runs the replica's `__del__` (graceful stop: the application deleted, scaled down or
redeployed), whose engine `shutdown` only closes Ray's token channel, then kills the actor
process outright, so vLLM's engine core and its workers outlive the replica (our plugin's
`engine.end_with_parent` then ends them, up to `ORPHAN_GRACE_S` later, after `serve --ray`
has already exited). This `LLMServer` also shuts the vLLM engine down in `__del__`, so when
Serve's graceful stop returns, the replica's engine processes have exited.
"""

from __future__ import annotations

import asyncio

from ray.serve.llm import LLMServer as _RayLLMServer


class LLMServer(_RayLLMServer):
    """Ray Serve LLM's `LLMServer` (same name, so the deployment and its replicas keep Ray's
    names) whose `__del__` also shuts down its vLLM engine (`AsyncLLM.shutdown`: the engine
    core is sent SIGTERM and waited for, and it stops its workers)."""

    async def __del__(self) -> None:
        await super().__del__()
        client = getattr(getattr(self, "engine", None), "_engine_client", None)  # Ray's VLLMEngine's AsyncLLM
        if client is not None:
            await asyncio.to_thread(client.shutdown)
