"""The machine a measurement ran on: one description for every report (`intp-vllm bench`,
`eval-needle`, `benchmarks/`), since ratios mean little without it.

VMs often name the CPU only "AMD EPYC", so the CPU family/model and its vector units are
read from /proc/cpuinfo too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ENV_KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
"""Environment variables that change how fast the engine runs; recorded when set."""


def cpu_details(cpuinfo: str) -> str:
    """Family/model and vector units from the text of /proc/cpuinfo."""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    units = [name for name, flag in (("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_tile"),
                                     ("AVX2", "avx2")) if flag in flags]
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {'/'.join(units) or 'no AVX2'}"


def machine_name() -> str:
    """"<CPU model name> (<n> cores), <OS> <arch>"."""
    text = CPUINFO.read_text() if CPUINFO.exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model} ({os.cpu_count()} cores), {platform.system()} {platform.machine()}"


def machine() -> dict:
    """name (GPU first when there is one, then `machine_name` and `cpu_details`), cores, Python,
    torch and its threads, the `ENV_KEYS` that are set, and the GPU."""
    import torch

    details = cpu_details(CPUINFO.read_text()) if CPUINFO.exists() else platform.processor()
    info = {"name": f"{machine_name()}; {details}", "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "env": {key: os.environ[key] for key in ENV_KEYS if key in os.environ}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["name"] = f"{info['gpu']} + {info['name']}"
    return info
