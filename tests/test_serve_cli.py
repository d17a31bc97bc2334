"""`intp-vllm serve` is vLLM's own `serve` subcommand with our settings: every vLLM server flag
works (any spelling of --hf-overrides; several API servers: tests/test_api_servers.py), and plain
vLLM serves a checkpoint through the installed plugin with the built-in chat template."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import requests

from intp_vllm.apps.serve import MIDDLEWARE, vllm_serve_args
from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE_PATH
from intp_vllm.video.io import write_video
from intp_vllm_benchmarks.load_test import chat_request, launch, served_model

ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4"]


@pytest.mark.parametrize("spelling", [
    ["--hf-overrides", json.dumps({"intp": {"frames": 16}, "vision_feature_layer": -2})],
    ["--hf-overrides.intp.frames", "16", "--hf-overrides.vision_feature_layer", "-2"],
    ["--hf_overrides.intp.frames=16", "--hf_overrides.vision_feature_layer=-2"],
], ids=["json", "dotted", "underscored"])
def test_hf_overrides_in_any_spelling_merge_with_our_flags(spelling):
    args = vllm_serve_args("/models/x", {"frames": 8, "rope_type": "ntk"}, [*spelling, "--port", "9"])
    assert args.hf_overrides == {"intp": {"frames": 16, "rope_type": "ntk"}, "vision_feature_layer": -2}
    assert args.model_tag == "/models/x" and args.port == 9
    assert args.chat_template == str(VIDEO_LLAVA_CHAT_TEMPLATE_PATH) and args.middleware == [MIDDLEWARE]


def test_a_given_chat_template_and_middleware_are_kept():
    args = vllm_serve_args("/models/x", {}, ["--chat-template", "/t.jinja", "--middleware", "my.Middleware"])
    assert args.chat_template == "/t.jinja" and args.middleware == ["my.Middleware", MIDDLEWARE]
    assert "intp" not in args.hf_overrides


@pytest.mark.parametrize("model_type, built_in", [("video_llava", True), ("llava_next_video", False)])
def test_the_built_in_chat_template_is_video_llava_s_only(tmp_path, model_type, built_in):
    """A LLaVA-NeXT-Video checkpoint keeps its own template (not necessarily Vicuna's): vLLM's
    tokenizer template or the plugin's fallback for chat_template.json."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    args = vllm_serve_args(str(tmp_path), {}, [])
    assert args.chat_template == (str(VIDEO_LLAVA_CHAT_TEMPLATE_PATH) if built_in else None)


@pytest.fixture(scope="module")
def media_and_plain(tmp_path_factory):
    """A media directory and an ordinary video in it."""
    from intp_vllm.research.synthetic import moving_shapes_video

    media = tmp_path_factory.mktemp("serve-cli-media")
    return media, write_video(media / "plain.mp4", moving_shapes_video(num_frames=16, height=72, width=96))


@pytest.mark.engine
def test_plain_vllm_serves_the_checkpoint_with_the_built_in_chat_template(tiny_model_dir, tmp_path, media_and_plain):
    """vLLM's own server entry, no intp-vllm code on the command line: the plugin registers the
    model, our loader, and the chat template for a checkpoint that has none."""
    media, plain = media_and_plain
    bare = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    (bare / "chat_template.jinja").unlink()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bare), *ENGINE,
               "--allowed-local-media-path", str(media)]
    with launch(command) as (url, log):
        body = chat_request(served_model(url), f"file://{plain}")
        body["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert "Loading chat template fallback" in log()
