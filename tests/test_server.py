"""A live `intp-vllm serve` on 127.0.0.1 driven by the openai client."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time

import pytest
import requests
from vllm import SamplingParams

from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import write_video

pytestmark = pytest.mark.engine

QUESTION = "What is happening in this video?"
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_llm):
    """The server shares the offline engine's media directory, so both read the same files."""
    port = free_port()
    command = [
        sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", "4", "--seed", "0",  # no memory flag: the plugin sizes the KV cache on CPU
        "--allowed-local-media-path", str(tiny_llm.media_dir),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base, STARTUP_TIMEOUT_S, lambda: process.stderr.read())
        yield base
    finally:
        stop(process)


def wait_healthy(process: subprocess.Popen, base: str, timeout_s: float, output) -> None:
    """Wait until the server at `base` answers /health with 200; fails the test, with the tail
    of `output()`, when the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {output()[-3000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("server did not become healthy in time")
        time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def video_path(tiny_llm):
    return write_video(tiny_llm.media_dir / "server-clip.mp4", moving_shapes_video(num_frames=24, height=72,
                                                                                   width=100, seed=7))


def messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def ask(client, url: str, **kwargs):
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages(url),
                                          max_tokens=12, temperature=0.0, **kwargs)


@pytest.fixture(scope="module")
def offline_answer(tiny_llm, video_path):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    return tiny_llm.chat(messages(f"file://{video_path}"), params, use_tqdm=False)[0].outputs[0].text


def test_file_url_answer_equals_offline_generate(client, video_path, offline_answer):
    reply = ask(client, f"file://{video_path}")
    assert reply.choices[0].message.content == offline_answer
    assert reply.usage.prompt_tokens > 8 * 17


def test_data_url_gives_the_same_answer(client, video_path, offline_answer):
    data_url = "data:video/mp4;base64," + base64.b64encode(video_path.read_bytes()).decode()
    assert ask(client, data_url).choices[0].message.content == offline_answer


def test_streamed_answer_equals_the_whole_one(client, video_path, offline_answer):
    chunks = ask(client, f"file://{video_path}", stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == offline_answer


def test_file_outside_the_allowed_directory_is_a_400_and_the_server_goes_on(client, video_path, offline_answer):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="must be a subpath of `--allowed-local-media-path"):
        ask(client, "file:///etc/passwd")
    assert ask(client, f"file://{video_path}").choices[0].message.content == offline_answer


SYSTEM = "You are a careful assistant. Answer briefly."


def assert_served_as_the_two_turn_prompt(client, tiny_llm, conversation, video_path) -> None:
    """The server's answer to `conversation` equals offline generate on the two-turn Vicuna prompt
    written out by hand, with the video once (prompt tokens and text)."""
    from intp_vllm.video.io import read_video

    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=conversation,
                                           max_tokens=12, temperature=0.0)
    prompt = f"{SYSTEM} USER: <video>\n{QUESTION} ASSISTANT: A circle moves.</s>USER: And the square? ASSISTANT:"
    expected = tiny_llm.generate({"prompt": prompt, "multi_modal_data": {"video": read_video(video_path, 8)}},
                                 SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.choices[0].message.content == expected.outputs[0].text


@pytest.mark.parametrize("system_content", [SYSTEM, [{"type": "text", "text": SYSTEM}]], ids=["string", "parts"])
def test_system_prompt_and_multi_turn_render_as_vicuna(client, tiny_llm, video_path, system_content):
    """What OpenAI clients send: a system message (string or parts), earlier turns, a text-only
    turn. The server's answer equals offline generate on the prompt written out by hand."""
    conversation = [
        {"role": "system", "content": system_content},
        *messages(f"file://{video_path}"),
        {"role": "assistant", "content": "A circle moves."},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
    ]
    assert_served_as_the_two_turn_prompt(client, tiny_llm, conversation, video_path)


def test_a_chat_that_resends_the_video_with_every_turn_has_it_once(client, tiny_llm, video_path):
    """Chat clients that attach the video to each turn (vLLM alone: a 400, one video a prompt):
    the prompt has the video once, where the first turn attached it, as written out by hand."""
    conversation = [
        {"role": "system", "content": SYSTEM},
        *messages(f"file://{video_path}"),
        {"role": "assistant", "content": "A circle moves."},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video_path}"}},
                                     {"type": "text", "text": "And the square?"}]},
    ]
    assert_served_as_the_two_turn_prompt(client, tiny_llm, conversation, video_path)


def test_text_only_request_is_served(client, tiny_llm):
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4, temperature=0.0,
                                           messages=[{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": "Hello?"}])
    expected = tiny_llm.get_tokenizer()(f"{SYSTEM} USER: Hello? ASSISTANT:").input_ids  # with BOS
    assert reply.usage.prompt_tokens == len(expected) and reply.usage.completion_tokens >= 1


def test_a_media_fragment_time_range_samples_that_span(client, tiny_llm, video_path):
    """`#t=1,2.5` on a file:// or data: URL (no --trust-request-mm-kwargs needed): the answer is
    offline generate's on the frames of that span; a range past the end or a malformed one is a 400."""
    from openai import BadRequestError

    from intp_vllm.video.io import read_video

    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = f"USER: <video>\n{QUESTION} ASSISTANT:"

    def offline(video):
        return tiny_llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, params,
                                 use_tqdm=False)[0].outputs[0].text

    in_range = offline(read_video(video_path, 8, start=1, end=2.5))
    assert in_range != offline(read_video(video_path, 8))  # the control: the whole video answers otherwise
    assert ask(client, f"file://{video_path}#t=1,2.5").choices[0].message.content == in_range
    data_url = "data:video/mp4;base64," + base64.b64encode(video_path.read_bytes()).decode()
    assert ask(client, f"{data_url}#t=npt:0:01,0:02.5").choices[0].message.content == in_range
    with pytest.raises(BadRequestError, match=r"start=5 s is at or past the end of .* \(3 s long\)"):
        ask(client, f"file://{video_path}#t=5")
    with pytest.raises(BadRequestError, match=r"video_url fragment #t=2,1: the end \(1 s\) must be after the start"):
        ask(client, f"file://{video_path}#t=2,1")


def test_the_sampled_frames_times_come_back_in_a_header(server, tiny_llm, video_path):
    """x-video-timestamps: the times of the frames the request's video_url was decoded at."""
    from intp_vllm.video.io import sample_video

    body = {"model": requests.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"], "max_tokens": 2,
            "temperature": 0.0, "messages": messages(f"file://{video_path}#t=1,2.5")}
    reply = requests.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    expected = sample_video(video_path, 8, start=1, end=2.5).timestamps
    assert reply.headers["x-video-timestamps"] == ",".join(f"{t:.3f}" for t in expected)
    assert expected[0] == pytest.approx(1.0) and expected[-1] == pytest.approx(2.375)  # 8 fps: frames 8..19
    text_only = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        **body, "messages": [{"role": "user", "content": "Hello?"}]})
    assert text_only.status_code == 200 and "x-video-timestamps" not in text_only.headers
