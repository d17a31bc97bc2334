"""Triton rotary embedding with a per-token RoPE scale, in place.

`scaled_rotary_(positions, query, key, scales, ...)` rotates query [T, Hq * head_size] and
key [T, Hk * head_size] (views with any row stride; the last dim contiguous) in place. Models call
it as `rotate_qkv_`, through the opaque op `torch.ops.intp_vllm.scaled_rotary_qkv_`, which
mutates the fused qkv that q and k were split from, whole (no copy of qkv under torch.compile). Each
token carries its own scale s (an 8-frame request s = 1, the original model): cos/sin are
computed on the fly from (position, s) — no cos/sin table per scale. The only table is the
scale-free `base ** (2i / d)` ([rotary_dim / 2] floats, cached per device), so that s = 1 uses
the same inv_freq bits as the torch reference and vLLM.

Per type (rope_type is a tl.constexpr), with pf_i = base ** (2i / d):

- none:   inv_i = 1 / pf_i
- linear: inv_i = (1 / pf_i) / s                                  (position interpolation)
- ntk:    inv_i = 1 / base'^(2i/d), base' = base * s^(d/(d-2))    (NTK-aware, the INTP paper)
- yarn:   inv_i = 1/(s pf_i) * (1 - e_i) + (1/pf_i) * e_i, e_i = 1 - ramp_i, and cos/sin times
          0.1 ln s + 1; the ramp is clamp((i - low) / (high - low), 0, 1) in-kernel, with the
          two scale-free bounds `yarn_ramp` = (low, high) given by the caller
          (`intp_vllm.core.rope_scaling.yarn_ramp_bounds`, as transformers computes them)

and at s == 1 every type is plain RoPE exactly. One program per (token, block of heads):
it computes cos/sin once and rotates that block of query heads and key heads. NeoX (halves)
and GPT-J (interleaved pairs) layouts; partial rotary (dims past rotary_dim untouched); math
in fp32, stored in the input dtype (fp32/fp16/bf16).

Importable without a GPU (and without Triton: then only the input checks run). On a CPU
host the kernel runs only under TRITON_INTERPRET=1 (tests); serving on CPU uses
`intp_vllm.vllm_ext.rotary`. This package imports nothing from `intp_vllm`: it takes plain
numbers.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    HAS_TRITON = False

ROPE_TYPES = {"none": 0, "linear": 1, "ntk": 2, "yarn": 3}
"""The kernel's constexpr code of each RoPE type it computes (the package's `dynamic` is `ntk`
at the request's scale)."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(x_ptr, row, heads, h, i, cos, sin, imask, HEAD_SIZE: tl.constexpr, HALF: tl.constexpr,
                      IS_NEOX: tl.constexpr):
        mask = (h < heads)[:, None] & imask[None, :]
        base = x_ptr + row + h[:, None] * HEAD_SIZE
        if IS_NEOX:
            x1 = tl.load(base + i[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        else:  # interleaved pairs: one contiguous load of [heads, pairs, 2], split in registers
            pair = tl.arange(0, 2)
            offsets = 2 * i[None, :, None] + pair[None, None, :]
            pair_mask = mask[:, :, None] & (pair[None, None, :] < 2)
            x1, x2 = tl.split(tl.load(base[:, :, None] + offsets, mask=pair_mask, other=0.0).to(tl.float32))
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        if IS_NEOX:
            tl.store(base + i[None, :], y1.to(x_ptr.dtype.element_ty), mask=mask)
            tl.store(base + HALF + i[None, :], y2.to(x_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(base[:, :, None] + offsets, tl.join(y1, y2).to(x_ptr.dtype.element_ty), mask=pair_mask)

    @triton.jit
    def _scaled_rotary_kernel(q_ptr, k_ptr, pos_ptr, scale_ptr, pos_freq_ptr, consts_ptr, q_row_stride,
                              k_row_stride, num_q_heads, num_k_heads,
                              ROTARY_DIM: tl.constexpr, HEAD_SIZE: tl.constexpr, HALF: tl.constexpr,
                              HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr,
                              ROPE_TYPE: tl.constexpr, HAS_KEY: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        pos = tl.load(pos_ptr + token).to(tl.float32)
        s = tl.load(scale_ptr + token).to(tl.float32)
        i = tl.arange(0, HALF_PAD)
        imask = i < HALF
        pos_freq = tl.load(pos_freq_ptr + i, mask=imask, other=1.0)
        inv0 = tl.math.div_rn(tl.full([HALF_PAD], 1.0, tl.float32), pos_freq)
        att = 1.0
        if ROPE_TYPE == 0:
            inv = inv0
        elif ROPE_TYPE == 1:
            # tl.full, not tl.zeros (a @jit helper): builtins still interpret after vLLM imported Triton compiled
            inv = tl.math.div_rn(inv0, tl.full([HALF_PAD], 0.0, tl.float32) + s)
        elif ROPE_TYPE == 2:
            # base'^(2i/d) in fp64 (a few flops per program), rounded once: within ~1 ulp of torch's fp32 pow
            log2_base = tl.load(consts_ptr)  # fp64
            ntk_exponent = tl.load(consts_ptr + 1)  # d / (d - 2), fp64
            exponent = (2 * i).to(tl.float64) / ROTARY_DIM
            log2_scaled_base = log2_base + ntk_exponent * tl.log2(s.to(tl.float64))
            inv = (1.0 / tl.exp2(exponent * log2_scaled_base)).to(tl.float32)
        else:
            yarn_low = tl.load(consts_ptr + 2).to(tl.float32)
            yarn_span = tl.load(consts_ptr + 3).to(tl.float32)
            ramp = tl.math.div_rn(i.to(tl.float32) - yarn_low, tl.full([HALF_PAD], 0.0, tl.float32) + yarn_span)
            ramp = tl.minimum(tl.maximum(ramp, 0.0), 1.0)
            extrapolation = 1.0 - ramp
            interpolated = tl.math.div_rn(tl.full([HALF_PAD], 1.0, tl.float32), s * pos_freq)
            inv = interpolated * (1.0 - extrapolation) + inv0 * extrapolation
            att = tl.where(s > 1.0, 0.1 * tl.log(s) + 1.0, 1.0)
        inv = tl.where(s == 1.0, inv0, inv)  # scale 1 is plain RoPE, bit for bit
        angle = pos * inv
        cos = tl.cos(angle) * att
        sin = tl.sin(angle) * att
        h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr, token * q_row_stride, num_q_heads, h, i, cos, sin, imask, HEAD_SIZE, HALF, IS_NEOX)
        if HAS_KEY:
            _rotate_heads(k_ptr, token * k_row_stride, num_k_heads, h, i, cos, sin, imask, HEAD_SIZE, HALF,
                          IS_NEOX)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(rope_type: str, base: float, rotary_dim: int, yarn_ramp: tuple[float, float],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(base ** (2i / d) fp32 [d/2] computed as transformers/vLLM do, fp64 constants [log2 base, d/(d-2),
    yarn low, yarn high - low]), cached per parameters and device: scale-free, no cos/sin."""
    low, high = (float(yarn_ramp[0]), float(yarn_ramp[1])) if rope_type == "yarn" else (0.0, 1.0)
    key = (rope_type, float(base), rotary_dim, low, high, str(device))
    tables = _TABLES.get(key)
    if tables is None:
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dim
        consts = torch.tensor([math.log2(base), rotary_dim / (rotary_dim - 2), low, high - low], dtype=torch.float64)
        tables = _TABLES[key] = ((float(base) ** exponents).to(device), consts.to(device))
    return tables


def _interpreting() -> bool:
    """Whether this module's kernel was built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_scaled_rotary_kernel).__name__ == "InterpretedFunction"


def _check_inputs(positions, query, key, scales, head_size, rotary_dim, rope_type, base, yarn_ramp):
    for name, value in (("positions", positions), ("query", query), ("scales", scales)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if key is not None and not isinstance(key, torch.Tensor):
        raise TypeError(f"key must be a torch.Tensor or None, got {type(key).__name__}")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    if not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    if not isinstance(rotary_dim, int) or rotary_dim < 4 or rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_dim must be an even int in [4, head_size={head_size}], got {rotary_dim!r}")
    if not base > 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")
    if rope_type == "yarn" and not (len(yarn_ramp) == 2 and 0 <= yarn_ramp[0] < yarn_ramp[1]):
        raise ValueError(f"yarn_ramp must be (low, high) frequency indices with 0 <= low < high for yarn, "
                         f"got {tuple(yarn_ramp)!r}")
    if positions.ndim != 1:
        raise ValueError(f"positions must be 1-D [num_tokens], got shape {tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    tokens = positions.shape[0]
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if scales.ndim != 1 or scales.shape[0] != tokens:
        raise ValueError(f"scales must be 1-D of length num_tokens={tokens}, got shape {tuple(scales.shape)}")
    for name, x in (("query", query), ("key", key)):
        if x is None:
            continue
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x.ndim != 2 or x.shape[0] != tokens:
            raise ValueError(f"{name} must be 2-D [num_tokens={tokens}, heads * head_size], got {tuple(x.shape)}")
        if x.shape[1] % head_size:
            raise ValueError(f"{name} last dim {x.shape[1]} is not a multiple of head_size={head_size}")
        if x.stride(1) != 1 and x.shape[1] > 1:
            raise ValueError(f"{name} last dim must be contiguous (stride 1), got strides {tuple(x.stride())}")
    if key is not None and key.dtype != query.dtype:
        raise TypeError(f"key dtype {key.dtype} differs from query dtype {query.dtype}")
    devices = {("positions", positions.device), ("query", query.device), ("scales", scales.device)}
    if key is not None:
        devices.add(("key", key.device))
    if len({d for _, d in devices}) != 1:
        listing = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda p: p[0]))
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; serving falls back to intp_vllm.vllm_ext.rotary")
    if query.device.type == "cpu" and not _interpreting():
        raise ValueError("query is on the CPU: the Triton kernel needs a GPU (or TRITON_INTERPRET=1 set before "
                         "this module is imported, for tests); "
                         "serving on CPU uses intp_vllm.vllm_ext.rotary")


def scaled_rotary_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, scales: torch.Tensor, *,
                   head_size: int, rotary_dim: int, is_neox: bool, rope_type: str, base: float,
                   yarn_ramp: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query [T, Hq * head_size] and key [T, Hk * head_size] (or None) IN PLACE; returns them.

    positions: int32/int64 [T]; scales: float32 [T], each token's RoPE scale s >= 1; yarn_ramp:
    YaRN's (low, high) ramp bounds in frequency indices, used only for rope_type "yarn".
    """
    _check_inputs(positions, query, key, scales, head_size, rotary_dim, rope_type, base, yarn_ramp)
    tokens = positions.shape[0]
    if tokens == 0:
        return query, key
    q_heads = query.shape[1] // head_size
    k_heads = key.shape[1] // head_size if key is not None else 0
    half = rotary_dim // 2
    half_pad = triton.next_power_of_2(half)
    heads = max(q_heads, k_heads)
    # measured on an H100 (a sweep of heads/program x warps): NeoX wants all heads of a
    # token in one program; GPT-J's [heads, pairs, 2] tiles want 8 heads and 2 warps
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // half_pad if is_neox else 8))
    num_warps = 4 if is_neox else 2
    pos_freq, consts = _tables(rope_type, base, rotary_dim, yarn_ramp, query.device)
    grid = (tokens, triton.cdiv(heads, block_h))
    _scaled_rotary_kernel[grid](
        query, key if key is not None else query, positions, scales, pos_freq, consts,
        query.stride(0), key.stride(0) if key is not None else 0, q_heads, k_heads,
        ROTARY_DIM=rotary_dim, HEAD_SIZE=head_size, HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h,
        IS_NEOX=bool(is_neox), ROPE_TYPE=ROPE_TYPES[rope_type], HAS_KEY=key is not None, num_warps=num_warps,
    )
    return query, key


def _scaled_rotary_qkv_op(positions: torch.Tensor, qkv: torch.Tensor, scales: torch.Tensor, q_start: int,
                          q_width: int, k_start: int, k_width: int, head_size: int, rotary_dim: int, is_neox: bool,
                          rope_type: str, base: float, ramp_low: float, ramp_high: float) -> None:
    key = qkv[:, k_start:k_start + k_width] if k_width else None
    scaled_rotary_(positions, qkv[:, q_start:q_start + q_width], key, scales, head_size=head_size,
                   rotary_dim=rotary_dim, is_neox=is_neox, rope_type=rope_type, base=base,
                   yarn_ramp=(ramp_low, ramp_high))


def _register_op():
    """`torch.ops.intp_vllm.scaled_rotary_qkv_`: the kernel as an opaque op that mutates the whole
    `qkv` [T, width] in place, rotating query columns [q_start, q_start + q_width) and key columns
    [k_start, k_start + k_width) (none when k_width is 0). vLLM's torch.compile graph calls it (as
    it calls vLLM's own rotary op) instead of tracing Triton. Mutating qkv whole, not the q and k
    views of `qkv.split`, lets Inductor run it on qkv's own buffer: vLLM compiles with
    auto-functionalization v1, which clones every mutated view it cannot re-inplace (two
    near-full copies of qkv a layer) and re-inplaces only vLLM's own rotary op."""
    if not hasattr(torch.ops.intp_vllm, "scaled_rotary_qkv_"):  # a second copy of this module reuses the first's
        op = torch.library.custom_op("intp_vllm::scaled_rotary_qkv_", mutates_args=("qkv",))(_scaled_rotary_qkv_op)
        op.register_fake(lambda *args: None)
    return torch.ops.intp_vllm.scaled_rotary_qkv_


scaled_rotary_qkv_op = _register_op()


def split_from(query: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor query and key were split from as vLLM's attention layers split it,
    `q, k, v = qkv.split([q_width, k_width, k_width], dim=-1)` (2-D, stride-1 rows, query in
    the first columns and key right after), or None. Under torch.compile the layout is taken from
    the shapes (storage offsets cannot be traced); in eager mode the offsets are checked too."""
    qkv = query._base
    if key is None or qkv is None or key._base is not qkv or qkv.ndim != 2 or qkv.stride(1) != 1:
        return None
    if query.stride() != qkv.stride() or key.stride() != qkv.stride() or query.shape[0] != qkv.shape[0]:
        return None
    if qkv.shape[1] != query.shape[1] + 2 * key.shape[1]:
        return None
    if not torch.compiler.is_compiling() and (query.storage_offset() != qkv.storage_offset()
                                              or key.storage_offset() != qkv.storage_offset() + query.shape[1]):
        return None
    return qkv


def rotate_qkv_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, scales: torch.Tensor, *,
                head_size: int, rotary_dim: int, is_neox: bool, rope_type: str, base: float,
                yarn_ramp: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scaled_rotary_` through `scaled_rotary_qkv_op`, IN PLACE; returns (query, key). When query
    and key were split from one qkv (`split_from`), the op mutates that qkv whole; otherwise it
    rotates query, then key, each as a tensor of its own."""
    ramp_low, ramp_high = yarn_ramp
    rope = (head_size, rotary_dim, is_neox, rope_type, base, ramp_low, ramp_high)
    qkv = split_from(query, key)
    if qkv is not None:
        scaled_rotary_qkv_op(positions, qkv, scales, 0, query.shape[1], query.shape[1], key.shape[1], *rope)
        return query, key
    for x in (query, key):
        if x is not None:
            scaled_rotary_qkv_op(positions, x, scales, 0, x.shape[1], 0, 0, *rope)
    return query, key
