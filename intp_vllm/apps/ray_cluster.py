"""Joining an existing Ray cluster (`--ray-address` of `intp-vllm batch` and `serve --ray`)."""

from __future__ import annotations

import os


def join_ray_cluster(ray, address: str, runtime_env: dict | None = None) -> None:
    """`ray.init(address=address, runtime_env=runtime_env)`; raises ConnectionError naming the address, with what a
    cluster with token authentication needs (Ray 2.60 enables it for new local clusters and for
    `ray start` where ~/.ray/auth_token exists) when this environment does not ask for tokens."""
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError) as exc:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token "
                    "(~/.ray/auth_token or RAY_AUTH_TOKEN)")
        raise ConnectionError(f"cannot join the Ray cluster at --ray-address {address!r}: {exc}{hint}") from None
