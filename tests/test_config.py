"""The `intp` section: defaults from the checkpoint, errors that list what is allowed."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from intp_vllm.core.config import IntpConfig


@pytest.fixture(scope="module")
def hf_config(tiny_model_dir):
    return AutoConfig.from_pretrained(tiny_model_dir)


def with_intp(hf_config, section):
    hf_config.intp = section
    return hf_config


def test_defaults_follow_the_checkpoint(hf_config):
    intp = IntpConfig.from_hf_config(with_intp(hf_config, None))
    assert (intp.frames, intp.encoder_frames, intp.rope_type, intp.factor) == (8, 8, "yarn", "auto")
    assert intp.frame_limit == 8


def test_settings_are_read(hf_config):
    intp = IntpConfig.from_hf_config(with_intp(hf_config, {"frames": 64, "rope_type": "ntk", "factor": 4,
                                                           "max_frames": 128}))
    assert (intp.frames, intp.rope_type, intp.factor, intp.frame_limit) == (64, "ntk", 4, 128)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"frame": 32}, r"unknown intp key\(s\) \['frame'\]; allowed: \['encoder_frames', 'factor', 'fps', 'frames'"),
        ({"rope_type": "ntk-aware"}, "rope_type 'ntk-aware' is not one of none, linear, ntk, yarn, dynamic"),
        ({"factor": 0.5}, 'intp.factor must be a number >= 1 or "auto", got 0.5'),
        ({"factor": "big"}, 'intp.factor must be a number >= 1 or "auto", got \'big\''),
        ({"frames": 0}, "intp.frames must be a positive integer, got 0"),
        ({"grouping": "random"}, "grouping 'random' is not one of interleaved, consecutive"),
        ({"frames": 64, "max_frames": 32}, r"intp.max_frames \(32\) must be at least intp.frames \(64\)"),
        ({"fps": 0}, r"intp.fps must be frames a second of video, a number > 0, got 0"),
        ({"fps": "1"}, r"intp.fps must be frames a second of video, a number > 0, got '1'"),
        ("yes", "intp must be a mapping"),
        ({"rope_type": "dynamic", "factor": 2}, 'takes its scale from each request.s length; set intp.factor to "auto"'),
    ],
)
def test_bad_settings_name_what_is_allowed(hf_config, section, message):
    with pytest.raises(ValueError, match=message):
        IntpConfig.from_hf_config(with_intp(hf_config, section))


@pytest.mark.engine
def test_bad_settings_fail_at_engine_start(tiny_model_dir):
    from conftest import make_llm

    with pytest.raises(ValueError, match=r"unknown intp key\(s\) \['frame'\]"):
        make_llm(tiny_model_dir, hf_overrides={"intp": {"frame": 32}})


NGRAM_DRAFTER = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}


@pytest.mark.usefixtures("vllm_config_here")
def test_speculative_decoding_is_refused_with_per_request_scales(tiny_model_dir):
    """Drafters read positions as KV-cache slots; with factor auto they carry scale codes."""
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="--speculative-config cannot be used with intp factor 'auto'"):
        EngineArgs(model=str(tiny_model_dir), speculative_config=NGRAM_DRAFTER).create_engine_config()
    fixed = EngineArgs(model=str(tiny_model_dir), hf_overrides={"intp": {"factor": 4.0}},
                       speculative_config=NGRAM_DRAFTER).create_engine_config()
    assert fixed.speculative_config.method == "ngram"


@pytest.mark.usefixtures("vllm_config_here")
def test_aot_compile_is_turned_off_for_per_request_scales_and_refused_when_forced(tiny_model_dir, monkeypatch):
    """vLLM's AOT compile drops the per-request rotary op from the compiled graph
    (tests/test_compiled_engine.py): the config hook turns it off for factor auto unless set, and
    refuses it set to 1 on a compiled engine; eager engines and fixed factors keep it."""
    import os

    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    EngineArgs(model=str(tiny_model_dir), hf_overrides={"intp": {"factor": 4.0}}).create_engine_config()
    assert "VLLM_USE_AOT_COMPILE" not in os.environ  # a fixed factor runs vLLM's own rotary op
    EngineArgs(model=str(tiny_model_dir)).create_engine_config()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    with pytest.raises(ValueError, match="VLLM_USE_AOT_COMPILE=1 drops intp's per-request rotary op"):
        EngineArgs(model=str(tiny_model_dir)).create_engine_config()
    EngineArgs(model=str(tiny_model_dir), enforce_eager=True).create_engine_config()


@pytest.mark.usefixtures("vllm_config_here")
def test_cpu_kv_cache_is_sized_by_the_plugin_unless_given(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from intp_vllm.vllm_ext.cpu_memory import BLOCK_ALLOWANCE_TOKENS, KV_CACHE_FLOOR_BYTES, kv_bytes_per_token

    config = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_num_seqs=2).create_engine_config()
    per_token = kv_bytes_per_token(config.model_config)
    full = config.model_config.max_model_len + BLOCK_ALLOWANCE_TOKENS
    assert config.cache_config.kv_cache_memory_bytes == max(KV_CACHE_FLOOR_BYTES, 2 * full * per_token)
    long = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_num_seqs=128,
                      hf_overrides={"intp": {"max_frames": 1024}}).create_engine_config()
    assert long.model_config.max_model_len == 1024 * 17 + 512
    assert long.cache_config.kv_cache_memory_bytes == (
        2 * (1024 * 17 + 512 + BLOCK_ALLOWANCE_TOKENS) + 126 * (8 * 17 + 512)) * per_token
    given = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=123 << 20).create_engine_config()
    assert given.cache_config.kv_cache_memory_bytes == 123 << 20
    share = EngineArgs(model=str(tiny_model_dir), gpu_memory_utilization=0.3).create_engine_config()
    assert share.cache_config.kv_cache_memory_bytes is None


def test_a_server_frame_count_outside_intp_is_refused(tiny_model_dir):
    """The frame count has one home: --frames (intp.frames); per request mm_processor_kwargs.frames."""
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match=r"--media-io-kwargs video.num_frames=16: the frame count is INTP's; set it "
                                         r"with --frames \(now 8\)"):
        EngineArgs(model=str(tiny_model_dir), media_io_kwargs={"video": {"num_frames": 16}}).create_model_config()
    same = EngineArgs(model=str(tiny_model_dir), media_io_kwargs={"video": {"num_frames": 8}}).create_model_config()
    assert same.multimodal_config.media_io_kwargs["video"]["num_frames"] == 8


def test_a_memory_setting_is_told_from_vllms_default():
    """vLLM's default gpu_memory_utilization is 0.92 to 0.33 and None from 0.34: either is
    "not set", so the plugin sizes the CPU KV cache on every line."""
    from vllm.config import CacheConfig

    from intp_vllm.vllm_ext.cpu_memory import memory_setting_given

    assert not memory_setting_given(CacheConfig())
    assert memory_setting_given(CacheConfig(gpu_memory_utilization=0.3))
    assert memory_setting_given(CacheConfig(kv_cache_memory_bytes=64 << 20))


def test_an_explicit_max_model_len_past_the_checkpoint_is_accepted_with_intp_and_checked(tiny_model_dir):
    """--max-model-len past max_position_embeddings (2048 here) starts when INTP extends RoPE, with no
    VLLM_ALLOW_LONG_MAX_MODEL_LEN; one too short for --max-frames is refused at start, naming the flags."""
    from vllm.engine.arg_utils import EngineArgs

    from intp_vllm.apps.flags import with_long_context

    def config(intp: dict, max_model_len: int):
        overrides = with_long_context({"intp": intp}, max_model_len)
        return EngineArgs(model=str(tiny_model_dir), max_model_len=max_model_len,
                          hf_overrides=overrides).create_model_config()

    assert config({"max_frames": 512}, 16384).max_model_len == 16384  # 512 x 17 tokens + text
    with pytest.raises(ValueError, match=r"max_model_len 4096 is too short for intp.max_frames 512 \(8704 video "
                                         r"tokens \+ 512 for text = 9216\): raise --max-model-len to 9216"):
        config({"max_frames": 512}, 4096)
    with pytest.raises(ValueError, match=r"User-specified max_model_len \(16384\) is greater than the derived"):
        config({"max_frames": 512, "rope_type": "none"}, 16384)  # no RoPE extension: vLLM's own refusal stands
    assert with_long_context({"intp": {}}, None) == {"intp": {}}
    assert with_long_context({"text_config": {"model_max_length": 5}}, 9) == {"text_config": {"model_max_length": 5}}


def test_max_model_len_and_the_encoder_budget_follow_the_servers_pruning(tiny_model_dir):
    """With --video-pruning-rate the longest video holds only its kept tokens, and max_model_len
    (so the KV of a full-length request) follows; a request at the default count may still turn
    pruning off, so that count unpruned is the floor."""
    from vllm.engine.arg_utils import EngineArgs

    from intp_vllm.vllm_ext.models.video_llava import VideoLlavaForConditionalGeneration as Adapter
    from intp_vllm.vllm_ext.pruning import VideoPruning

    def config(intp: dict, **kwargs):
        return EngineArgs(model=str(tiny_model_dir), hf_overrides={"intp": intp}, **kwargs).create_model_config()

    assert config({"max_frames": 1024}).max_model_len == 1024 * 17 + 512
    pruned = config({"max_frames": 1024}, video_pruning_rate=0.75)
    assert pruned.max_model_len == 1024 + 1024 * 16 // 4 + 512  # every CLS, a quarter of the patches, text
    assert config({"max_frames": 1024}, video_pruning_rate=0.75, video_pruning_method="vidcom2").max_model_len == \
        VideoPruning("vidcom2", 0.75).kept_tokens(1024, 17) + 512
    hf_config = config({"frames": 64, "max_frames": 128}).hf_config
    assert Adapter.max_video_tokens(hf_config, VideoPruning("evs", 0.9)) == 64 * 17  # 128 pruned: 332 tokens
    assert Adapter.max_video_tokens(hf_config) == 128 * 17
