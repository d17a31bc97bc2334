"""Per-request-scale rotary embedding against a single-scale cos/sin table, side by side in one run.

CPU (needs vLLM): vLLM's `RotaryEmbedding.forward_cpu` (its C++ op over a precomputed
single-scale cos/sin table; what an engine without per-request scales runs) against our
serving module `PerRequestRotaryEmbedding` (positions carry the scale code; per-token cos/sin
rows, then the same C++ op in place), eager and under `torch.compile` (how vLLM runs it by
default, the token count dynamic), at one scale and mixed scales.

GPU (needs only torch + Triton): our Triton kernel against the same table rotation compiled
by Inductor (vLLM's default GPU path for a plain RoPE, custom ops off) and against the eager
torch reference; achieved GB/s (q and k read and written once, plus positions and scales)
and the fraction of the device-to-device copy bandwidth measured in the same run.

Timings are interleaved (a, b, c, a, b, c, ...) and each median is reported, so load drift on
a shared machine hits all of them alike.

    python benchmarks/bench_rope.py                  # CPU sweep (and GPU where present) -> benchmarks/results/rope/
    python benchmarks/bench_rope.py --tokens 1024 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from intp_vllm.machine import machine
from intp_vllm.core.request_scale import POSITION_BITS, all_code_scales, request_scale_code
from intp_vllm.core.rope_scaling import yarn_ramp_bounds
from intp_vllm.vllm_ext.rotary import ROTARY_TYPES, _rotate, apply_scaled_rotary, cos_sin_rows, inv_freq_per_scale

ROOT = Path(__file__).resolve().parents[1]
BASE = 10000.0
ORIGINAL = 4096
MIXED_FRAMES = (8, 16, 32, 64)  # requests at these frame counts share one batch
TOKENS_PER_FRAME = 257


def batch_scales(tokens: int, mixed: bool) -> torch.Tensor:
    """Each token's scale code: a 32-frame request alone, or a batch of 8..64-frame requests."""
    frames = MIXED_FRAMES if mixed else (32,)
    codes = [request_scale_code(f * TOKENS_PER_FRAME, 8 * TOKENS_PER_FRAME) for f in frames]
    return torch.tensor(codes)[torch.arange(tokens) % len(codes)]


def inputs(tokens: int, heads: int, kv_heads: int, head_size: int, dtype, mixed: bool, device: str):
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 65536, (tokens,), generator=g)
    codes = batch_scales(tokens, mixed)
    q = torch.randn(tokens, heads * head_size, generator=g).to(dtype).to(device)
    k = torch.randn(tokens, kv_heads * head_size, generator=g).to(dtype).to(device)
    return positions.to(device), codes.to(device), q, k


def interleaved_medians(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """Median ms of each callable, timed round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(ts), 4) for name, ts in times.items()}


def table_rotation(cache: torch.Tensor, head_size: int, is_neox: bool):
    """vLLM's forward_native for a plain single-scale table: gather the position's cos/sin row, rotate."""
    half = head_size // 2

    def rotate(positions, q, k):
        rows = cache.index_select(0, positions)
        cos, sin = rows[:, :half], rows[:, half:]
        return _rotate(q, cos, sin, head_size, head_size, is_neox), _rotate(k, cos, sin, head_size, head_size, is_neox)

    return rotate


def single_scale_table(head_size: int, max_position: int, scale: float, rope_type: str, device) -> torch.Tensor:
    inv_freq, attention = inv_freq_per_scale([scale], rope_type=rope_type, base=BASE, rotary_dim=head_size,
                                             original_max_position=ORIGINAL)
    return cos_sin_rows(torch.arange(max_position), inv_freq[0], attention[0]).to(device)


def bench_cpu(args) -> list[dict]:
    from intp_vllm.vllm_ext.internals import RotaryEmbedding, VllmConfig, set_current_vllm_config
    from intp_vllm.vllm_ext.llm_rope import PerRequestRotaryEmbedding

    rows = []
    dtype = getattr(torch, args.dtype)
    for heads, kv_heads, head_size in args.shapes:
        for is_neox in args.layouts:
            with set_current_vllm_config(VllmConfig()):
                plain = RotaryEmbedding(head_size, head_size, 65536, BASE, is_neox, dtype)
            ours = PerRequestRotaryEmbedding(head_size=head_size, rotary_dim=head_size, base=BASE,
                                             rope_type=args.rope_type, original_max_position=ORIGINAL,
                                             is_neox_style=is_neox)
            compiled = torch.compile(ours)
            for tokens in args.tokens:
                for mixed in (False, True):
                    positions, codes, q, k = inputs(tokens, heads, kv_heads, head_size, dtype, mixed, "cpu")
                    encoded = positions | (codes << POSITION_BITS)  # what the M-RoPE hook hands the model
                    for tensor in (encoded, q, k):  # as in vLLM: the token count varies, the widths do not
                        torch._dynamo.mark_dynamic(tensor, 0)
                    ms = interleaved_medians({
                        "vllm_cpu_op_one_scale": lambda: plain.forward_cpu(positions, q, k),
                        "ours_eager": lambda: ours(encoded, q, k),
                        "ours_compiled": lambda: compiled(encoded, q, k),
                    }, args.repeats)
                    rows.append(report_row("cpu", args, heads, kv_heads, head_size, is_neox, tokens, mixed, ms,
                                           baseline="vllm_cpu_op_one_scale"))
    return rows


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second: the practical bandwidth peak."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = interleaved_medians({"copy": lambda: dst.copy_(src)}, 20, sync=torch.cuda.synchronize)["copy"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_cuda(args) -> tuple[list[dict], float]:
    from intp_vllm_kernels.scaled_rotary import scaled_rotary_

    peak = copy_bandwidth_gbps()
    scale_by_code = torch.tensor(all_code_scales(), device="cuda")
    rows = []
    for dtype_name in args.gpu_dtypes:
        dtype = getattr(torch, dtype_name)
        for heads, kv_heads, head_size in args.shapes:
            for is_neox in args.layouts:
                table = single_scale_table(head_size, 65536, 4.0, args.rope_type, "cuda")
                compiled_table = torch.compile(table_rotation(table, head_size, is_neox), dynamic=True)
                kw = dict(head_size=head_size, rotary_dim=head_size, is_neox=is_neox, rope_type=args.rope_type,
                          base=BASE, original_max_position=ORIGINAL)
                ramp = yarn_ramp_bounds(base=BASE, rotary_dim=head_size, original_max_position=ORIGINAL)
                kernel_kw = {**{k: v for k, v in kw.items() if k != "original_max_position"}, "yarn_ramp": ramp}
                for tokens in args.tokens:
                    for mixed in (False, True):
                        positions, codes, q, k = inputs(tokens, heads, kv_heads, head_size, dtype, mixed, "cuda")
                        scales = scale_by_code[codes]
                        ms = interleaved_medians({
                            "table_one_scale_compiled": lambda: compiled_table(positions, q, k),
                            "triton_per_token_scale": lambda: scaled_rotary_(positions, q, k, scales, **kernel_kw),
                            "torch_reference_eager": lambda: apply_scaled_rotary(positions, q, k, scales, **kw),
                        }, args.repeats, sync=torch.cuda.synchronize)
                        moved = 2 * (q.numel() + k.numel()) * q.element_size() + tokens * (8 + 4)
                        row = report_row(torch.cuda.get_device_name(), args, heads, kv_heads, head_size, is_neox,
                                         tokens, mixed, ms, baseline="table_one_scale_compiled", dtype=dtype_name)
                        row["GBps"] = {n: round(moved / (v * 1e-3) / 1e9, 1) for n, v in ms.items()}
                        row["fraction_of_copy_bandwidth"] = {n: round(g / peak, 3) for n, g in row["GBps"].items()}
                        print(f"    {row['GBps']['triton_per_token_scale']:.0f} GB/s = "
                              f"{row['fraction_of_copy_bandwidth']['triton_per_token_scale']:.0%} of copy", flush=True)
                        rows.append(row)
    return rows, peak


def report_row(device, args, heads, kv_heads, head_size, is_neox, tokens, mixed, ms, *, baseline, dtype=None) -> dict:
    row = {"device": device, "dtype": dtype or args.dtype, "heads": heads, "kv_heads": kv_heads,
           "head_size": head_size, "layout": "neox" if is_neox else "gptj", "tokens": tokens,
           "scales": "mixed" if mixed else "one", "rope_type": args.rope_type, "ms": ms,
           "time_vs_" + baseline: {n: round(v / ms[baseline], 3) for n, v in ms.items() if n != baseline}}
    print(f"{device} {row['dtype']} {heads}/{kv_heads}x{head_size} {row['layout']} T={tokens:6d} {row['scales']:5s}: "
          + " | ".join(f"{n} {v:.3f} ms" for n, v in ms.items()), flush=True)
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--shapes", nargs="+", default=["32x32x128", "8x8x64"],
                        help="HEADSxKV_HEADSxHEAD_SIZE (default: Vicuna-7B 32x32x128 and a small 8x8x64)")
    parser.add_argument("--layouts", nargs="+", choices=["neox", "gptj"], default=["neox", "gptj"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="CPU dtype")
    parser.add_argument("--gpu-dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rope-type", default="yarn", choices=ROTARY_TYPES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part (a GPU host without vLLM)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rope")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    args.layouts = [layout == "neox" for layout in args.layouts]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = {"benchmark": "rope", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if not args.no_cpu:
        record["cpu"] = bench_cpu(args)
    if torch.cuda.is_available():
        record["cuda"], record["copy_bandwidth_GBps"] = bench_cuda(args)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if "cuda" in record else "cpu"
    path = args.out / f"rope_{kind}_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
