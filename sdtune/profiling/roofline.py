"""The least time each kind of kernel in a step could take: the roofline, op by op.

Each op dispatched inside a Roofline is held to its FLOPs at a GEMM rate or to its bytes at a
memory bandwidth, whichever takes longer, and a fused attention kernel also to its exponentials at
the special-function units' rate; by_kind sums those floors by the kinds of
sdtune.profiling.kernels, so each can sit beside the kernel time measured for it.

How it counts:
- FLOPs: torch's flop_counter formulas, as the kernels do them (a fused attention backward's
  recomputed scores included: the kernel does that work).
- Bytes: each op reads its tensor inputs and writes its outputs once. That is the floor for a
  matmul, a convolution or an attention kernel. For everything else (norms, activations, residual
  adds, copies) it is what eager moves op by op, unfused: fusion (inductor's) skips the
  intermediates, so that row is an upper figure, not a floor. Views and allocations move nothing.
  FusionWindows gives the other end: the memory-bound ops between two GEMM-like ones fused into
  one kernel, which reads each tensor made outside it once and writes only what is needed later.
- LoRA: the products through the adapters' (linear) weights, and through what those products made
  (an autocast copy of a weight, the rank-wide x·Aᵀ and gradient·B), are counted apart within matmul.
- Attention: a step on real devices dispatches the fused kernels, counted as any op. On the meta
  device SDPA would run its math path (the scores written out), so FusedAttention counts those
  calls as the fused kernels run them.
- Exponentials: a fused attention kernel takes one per query-key pair in its softmax, and again in
  the backward, which recomputes the scores. A GPU's special-function units give them at a small
  fraction of the tensor cores' rate (an H100 SXM: 3.9 ×10¹² a second against 989 TFLOP/s), so
  with narrow heads (few FLOPs per pair) they, not the matmuls, can set the kernel's floor. The
  floor assumes the kernel overlaps them with its matmuls; `serial` is its time if it does not.
- CUDA autocast: meta has none, so a step counted there runs in one dtype throughout. CudaAutocast
  applies CUDA's casts instead (norms and softmax in float32, matmuls in bf16/fp16), to count what
  the eager step pays under autocast on a GPU, which a CPU's autocast (norms in bf16) cannot show.
"""

import collections
import contextlib

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from sdtune.errors import describe
from sdtune.profiling import hardware, kernels

aten = torch.ops.aten
LORA = "matmul: LoRA"
MEMORY = "memory-bound (norms, activations, residuals, copies)"
# The GEMM-like kinds keep their kernels' names; every other measured kind is memory-bound work.
COMPUTE = ("convolution", "matmul", "attention")
FREE = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided, aten.new_empty_strided,
        aten._unsafe_view, aten.detach, aten.lift_fresh, aten.alias}
CASTS = {aten._to_copy, aten.clone}  # autocast's copies of a LoRA weight are LoRA's too
WRITE_ONLY = {aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full,
              aten.zeros, aten.ones, aten.full, aten.randn_like, aten.rand_like, aten.randint}


def group(kind: str) -> str:
    """A kernel kind (sdtune.profiling.kernels), or LoRA's, as the roofline sums it: the GEMM-like
    kinds and LoRA's products by themselves, everything else as memory-bound work."""
    return kind if kind in (*COMPUTE, LORA) else MEMORY


def nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch to read or write `t`: its elements, or its storage where that is
    smaller (an expanded tensor repeats elements)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def score_pairs(packet, args, n_flops: int) -> int:
    """Query-key pairs a fused attention op scores (one exponential each), from its FLOPs as torch's
    formulas count them, which works for every layout (padded, nested): per pair the forward does
    two products, 2·(d_q + d_v) FLOPs, and the backward five, 2·(3·d_q + 2·d_v)."""
    backward = str(packet).endswith("_backward")
    q, v = (args[1], args[3]) if backward else (args[0], args[2])
    d_q, d_v = q.size(-1), v.size(-1)
    per_pair = 2 * (3 * d_q + 2 * d_v) if backward else 2 * (d_q + d_v)
    return n_flops // per_pair


class FusionWindows:
    """The bytes the memory-bound ops of a step would move if all of them between two GEMM-like
    ops (a convolution, a matmul, an attention kernel) ran as one fused kernel, as a compiler
    that fuses everything it can would run them: each storage made outside a window is read once
    by it, and a storage a window makes is written only if something outside the window reads it
    (a later GEMM-like op, another window: the backward, say), it outlives the step (a gradient,
    the optimizer's state) or it was there before the step (a weight updated in place). Neither
    bound is strict: a compiler may recompute cheap ops instead of keeping their results for the
    backward (less), and cannot fuse across every reduction (more)."""

    def __init__(self):
        self.window, self.read = 0, set()
        self.reads = collections.Counter()  # window: bytes it reads
        self.names = collections.defaultdict(set)  # window: the ops in it
        self.storages = {}  # storage key: {ref, window that last wrote it, bytes, external, readers}

    def _storage(self, t: torch.Tensor, written: bool) -> tuple[int, dict]:
        key = _key(t)
        found = self.storages.get(key)
        if found is None or found["ref"].expired():  # a freed storage's address can be taken again
            found = self.storages[key] = {"ref": StorageWeakRef(t.untyped_storage()), "window": None, "bytes": 0,
                                          "external": not written, "readers": set()}
        return key, found

    def op(self, name: str, ins, outs, memory_bound: bool) -> None:
        reader = self.window if memory_bound else None  # None: a GEMM-like op
        if memory_bound:
            self.names[self.window].add(name)
        for t in ins:
            key, storage = self._storage(t, written=False)
            storage["readers"].add(reader)
            if memory_bound and storage["window"] != self.window and (self.window, key) not in self.read:
                self.read.add((self.window, key))
                self.reads[self.window] += nbytes(t)
        for t in outs:
            _, storage = self._storage(t, written=True)
            storage["window"] = self.window if memory_bound else None
            storage["bytes"] = max(storage["bytes"], nbytes(t)) if memory_bound else 0
        if not memory_bound:
            self.window += 1

    def by_window(self) -> collections.Counter:
        """{window: bytes read and written}, once the step has run (what outlives it is alive then)."""
        moved = collections.Counter(self.reads)
        for s in self.storages.values():
            if s["window"] is not None and (s["external"] or s["readers"] - {s["window"]} or not s["ref"].expired()):
                moved[s["window"]] += s["bytes"]
        return moved

    def bytes(self) -> int:
        return sum(self.by_window().values())

    def by_norm(self) -> dict[str, int]:
        """The bytes of the windows that hold a group norm, a layer norm (forward or backward), or neither."""
        out = collections.Counter()
        for window, moved in self.by_window().items():
            names = " ".join(self.names[window])
            out["group norm" if "group_norm" in names else "layer norm" if "layer_norm" in names else "other"] += moved
        return dict(out)


class Roofline(TorchDispatchMode):
    """Counts every op dispatched inside it: ops[(op, kind)] sums, over its calls, calls, flops,
    bytes, exps and bound_seconds (each call's floor), with serial_seconds (its exponentials after its
    FLOPs instead of beside them) and the seconds of the calls whose bytes, or whose exponentials,
    set their floor (memory_bound_seconds, exp_bound_seconds). exp_tera_per_s: None where
    exponentials have no units of their own (a CPU): they are counted and bound nothing."""

    def __init__(self, peak_tflops: float, bandwidth_gbs: float, lora_params=(), exp_tera_per_s: float | None = None):
        super().__init__()
        self.saved_bytes = 0  # count() sets it: the activations autograd kept for the backward
        self.flop_rate, self.byte_rate = peak_tflops * 1e12, bandwidth_gbs * 1e9
        self.exp_rate = exp_tera_per_s * 1e12 if exp_tera_per_s else None
        self.ops = collections.defaultdict(collections.Counter)
        self.windows = FusionWindows()
        # Storages that are LoRA's: its weights, then the rank-wide products made from them. The
        # storages themselves are held, so that a freed one's address is never taken for another.
        self.lora = {_key(p): p.untyped_storage() for p in lora_params}
        # Only the rank-wide products (x·Aᵀ, gradient·B: the rank is their last dim) are followed:
        # a full-width one (x·Aᵀ·Bᵀ, or the gradient handed back to x) can become the buffer
        # autograd adds the base's gradient into, which the next layer's base matmuls then read.
        self.ranks = {min(p.shape) for p in lora_params if p.dim() == 2}

    def add(self, op: str, kind: str, n_flops: int, n_bytes: int, n_exps: int = 0) -> None:
        compute, memory = n_flops / self.flop_rate, n_bytes / self.byte_rate
        exps = n_exps / self.exp_rate if self.exp_rate else 0.0
        seconds = max(compute, exps, memory)
        self.ops[(op, kind)].update(
            calls=1, flops=n_flops, bytes=n_bytes, exps=n_exps, bound_seconds=seconds,
            serial_seconds=max(compute + exps, memory),
            memory_bound_seconds=seconds if memory >= max(compute, exps) else 0.0,
            exp_bound_seconds=seconds if exps > max(compute, memory) else 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in FREE:
            return out
        ins = list({id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}.values())
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        n_bytes = sum(map(nbytes, outs)) + (0 if packet in WRITE_ONLY else sum(map(nbytes, ins)))
        formula = flop_counter.flop_registry.get(packet)
        n_flops = formula(*args, **kwargs, out_val=out) if formula else 0
        kind = kernels.kind(str(packet))
        n_exps = score_pairs(packet, args, n_flops) if kind == "attention" and n_flops else 0
        lora = any(_key(t) in self.lora for t in ins)
        if lora and kind == "matmul":
            kind = LORA
            self.lora |= {_key(t): t.untyped_storage() for t in outs if t.dim() and t.shape[-1] in self.ranks}
        elif lora and packet in CASTS:
            self.lora |= {_key(t): t.untyped_storage() for t in outs}
        self.add(str(packet), kind, n_flops, n_bytes, n_exps)
        self.windows.op(str(packet), [] if packet in WRITE_ONLY else ins, outs, memory_bound=group(kind) == MEMORY)
        return out


class _FlashAttention(torch.autograd.Function):
    """SDPA as a fused kernel does it, counted into the active Roofline; the outputs are empty
    (on meta there are no values)."""

    @staticmethod
    def forward(ctx, mode, q, k, v):
        ctx.mode, roofline = mode, mode.roofline
        ctx.save_for_backward(q, k, v)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.out_bytes = nbytes(out)
        lse = q.numel() // q.shape[-1] * 4  # float32, one per query and head
        n_flops = flop_counter.sdpa_flop_count(*map(mode.padded, (q.shape, k.shape, v.shape)))
        ctx.pairs = q.numel() // q.shape[-1] * k.shape[-2]
        roofline.add("attention (forward)", "attention", n_flops, sum(map(nbytes, (q, k, v, out))) + lse, ctx.pairs)
        roofline.windows.op("attention (forward)", [q, k, v], [out], memory_bound=False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        lse = q.numel() // q.shape[-1] * 4
        n_flops = flop_counter.sdpa_backward_flop_count(*map(ctx.mode.padded, (grad_out.shape, q.shape, k.shape, v.shape)))
        # Reads Q, K, V, the output, its gradient and the log-sum-exp; writes Q's, K's and V's gradients.
        n_bytes = 2 * sum(map(nbytes, (q, k, v))) + ctx.out_bytes + nbytes(grad_out) + lse
        ctx.mode.roofline.add("attention (backward)", "attention", n_flops, n_bytes, ctx.pairs)
        ctx.mode.roofline.windows.op("attention (backward)", [q, k, v, grad_out], [], memory_bound=False)
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _plain_attention(func, args, kwargs) -> bool:
    """Whether a call is SDPA without a mask, dropout or causality, as the denoisers call it."""
    return func is F.scaled_dot_product_attention and len(args) == 3 and not any(
        kwargs.get(k) for k in ("attn_mask", "dropout_p", "is_causal", "enable_gqa"))


class FusedAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention without a mask, dropout or causality (as the denoisers
    call it) to _FlashAttention, whose counts go to `roofline`; other calls (a text encoder's causal
    mask) run and are counted as the math path's ops. With `head_multiple` its FLOPs are those of a
    kernel that pads each head to a multiple of that many (64: SD1.5's 40-wide heads cost as 64)."""

    def __init__(self, roofline: Roofline, head_multiple: int = 1):
        super().__init__()
        self.roofline, self.head_multiple = roofline, head_multiple

    def padded(self, shape):
        m = self.head_multiple
        return (*shape[:-1], -(-shape[-1] // m) * m)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _plain_attention(func, args, kwargs):
            return _FlashAttention.apply(self, *args)
        return func(*args, **kwargs)


# CUDA autocast's policy (aten/src/ATen/autocast_mode.cpp) for the ops a denoiser's step calls: the
# GEMM-like ones in the low dtype; norms, softmax, a few pointwise ops and reductions, and upsampling
# (the UNet's up blocks, F.interpolate) in float32. tests/test_roofline.py checks each name against
# torch's own lists, and the aten ops a step dispatches against autocast_mode.h's.
LOW_PRECISION = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                 torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
                 F.scaled_dot_product_attention}
FLOAT32 = {F.group_norm, F.layer_norm, F.rms_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
           torch.exp, torch.Tensor.exp, torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow,
           torch.sum, torch.Tensor.sum, F.mse_loss, F.interpolate}
# F.interpolate's one mode that is no upsample_* op: adaptive_avg_pool2d, which autocast leaves alone.
_NOT_UPSAMPLING = "area"


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts, on any device: the inputs of a LOW_PRECISION function that are float32
    go to `dtype`, those of a FLOAT32 one that are bf16/fp16 go to float32, and every other op runs
    in its inputs' dtypes (type promotion, as under autocast). Autocast does this per aten op; this
    does it per Python function, the first one a call reaches (nn.GroupNorm's F.group_norm, say)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOW_PRECISION:
            args, kwargs = _cast((args, kwargs), {torch.float32}, self.dtype)
        elif func in FLOAT32 and not (func is F.interpolate and _mode(args, kwargs) == _NOT_UPSAMPLING):
            args, kwargs = _cast((args, kwargs), {torch.bfloat16, torch.float16}, torch.float32)
        return func(*args, **kwargs)


def _mode(args, kwargs) -> str:
    """F.interpolate's mode: its fourth argument (input, size, scale_factor, mode)."""
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


def _cast(tree, sources: set, dtype: torch.dtype):
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in sources else t, tree)


@torch.library.custom_op("sdtune::fused_attention", mutates_args=())
def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA as one opaque op that, like a flash kernel, keeps its output and a float32 log-sum-exp
    per query for the backward (never the scores). Only traced: compiled_saved runs it on meta."""
    return F.scaled_dot_product_attention(q, k, v), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_fused_attention.register_fake
def _(q, k, v):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fused_attention_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


@torch.library.custom_op("sdtune::fused_attention_backward", mutates_args=())
def _fused_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as one op that reads all a flash backward reads, so the partitioner keeps them."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_fused_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention_backward(ctx, grad_out, grad_lse):
    return torch.ops.sdtune.fused_attention_backward(grad_out, *ctx.saved_tensors)


_fused_attention.register_autograd(_fused_attention_backward, setup_context=_fused_attention_context)


class _OneAttentionOp(TorchFunctionMode):
    """Plain SDPA calls (no mask, dropout or causality) go to sdtune::fused_attention."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _plain_attention(func, args, kwargs):
            return torch.ops.sdtune.fused_attention(*args)[0]
        return func(*args, **kwargs)


def compiled_saved(module, *args, cuda_autocast: torch.dtype | None = None, **kwargs) -> dict:
    """What a torch.compile'd forward of module(*args, **kwargs) keeps for its backward: Dynamo's
    graph split by AOTAutograd's min-cut partitioner, the one inductor uses, with each plain SDPA
    call one fused op (sdtune::fused_attention). Run on meta, nothing is computed. Graph inputs
    (weights, the batch) are left out: they are there anyway. cuda_autocast: under CudaAutocast.
    {bytes, float32_bytes, tensors}."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    kept = {}  # storage -> (bytes, dtype): q, k and v kept as views of one projection are one tensor

    def forward_graph(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for n in outputs:
            if isinstance(n, torch.fx.Node) and n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor):
                t = n.meta["val"]
                kept[_key(t)] = (t.untyped_storage().nbytes(), t.dtype)
        return gm

    # Inductor's decompositions too: with a norm split into pointwise ops and reductions, the
    # partitioner can recompute its output from its input and statistics instead of keeping it.
    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=lambda gm, example_inputs: gm,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    casts = CudaAutocast(cuda_autocast) if cuda_autocast else contextlib.nullcontext()
    torch._dynamo.reset()
    try:
        with _OneAttentionOp(), casts:
            torch.compile(module, backend=backend, fullgraph=True)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    # The forward's own outputs are among them too (the prediction): small beside the rest.
    return {"bytes": sum(n for n, _ in kept.values()), "tensors": len(kept),
            "float32_bytes": sum(n for n, dtype in kept.values() if dtype == torch.float32)}


EMPTY = {"flops": 0, "bytes": 0, "exps": 0, "bound_ms": 0.0, "memory_bound_ms": 0.0, "exp_bound_ms": 0.0,
         "serial_ms": 0.0, "fused_bytes": 0, "fused_ms": 0.0}


def by_kind(roofline: Roofline) -> dict[str, dict]:
    """{kind: {flops, bytes, exps, bound_ms, memory_bound_ms, exp_bound_ms, serial_ms, fused_bytes,
    fused_ms}}: the parts of bound_ms from ops whose bytes, or whose exponentials, set their time;
    serial_ms as bound_ms with each op's exponentials after its FLOPs instead of beside them; and,
    for the memory-bound kind, what it moves fused between GEMM-like ops (FusionWindows)."""
    out = collections.defaultdict(lambda: dict(EMPTY))
    for (_, kind), op in roofline.ops.items():
        row = out[group(kind)]
        for key in ("flops", "bytes", "exps"):
            row[key] += op[key]
        for key in ("bound", "memory_bound", "exp_bound", "serial"):
            row[f"{key}_ms"] += op[f"{key}_seconds"] * 1e3
    if MEMORY in out:
        by_norm = roofline.windows.by_norm()
        fused = sum(by_norm.values())
        out[MEMORY] |= {"fused_bytes": fused, "fused_ms": fused / roofline.byte_rate * 1e3, "fused_by_norm": by_norm}
    return dict(out)


def count(fn, *args, peak_tflops: float, bandwidth_gbs: float, lora_params=(), fused_attention=False,
          head_multiple: int = 1, exp_tera_per_s: float | None = None, cuda_autocast: torch.dtype | None = None) -> Roofline:
    """One call fn(*args), counted. fused_attention: count SDPA as FusedAttention does (on meta);
    cuda_autocast: run it under CudaAutocast to that dtype."""
    counted = Roofline(peak_tflops, bandwidth_gbs, lora_params, exp_tera_per_s)
    swap = FusedAttention(counted, head_multiple) if fused_attention else contextlib.nullcontext()
    # Entered after FusedAttention, so it sees SDPA first and hands it on with its inputs cast.
    casts = CudaAutocast(cuda_autocast) if cuda_autocast else contextlib.nullcontext()
    kept = {}  # storage -> itself, of what autograd keeps for the backward other than the weights

    def keep(t):
        # The weights were there before the step, and a view of one (the weight.t() that F.linear's
        # addmm saves) is the weight's memory too.
        if not isinstance(t._base if t._is_view() else t, torch.nn.Parameter):
            kept[_key(t)] = t.untyped_storage()  # held, so that no other storage takes its address
        return t

    with swap, casts, counted, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn(*args)
    counted.saved_bytes = sum(storage.nbytes() for storage in kept.values())
    return counted


def measured_by_kind(rows) -> dict[str, float]:
    """A kernel breakdown's rows (kernels.breakdown) as ms per step by this module's kinds: every
    kind but the GEMM-like ones is memory-bound work."""
    ms = collections.Counter()
    for row in rows:
        ms[row["kind"] if row["kind"] in COMPUTE else MEMORY] += row["ms"]
    return dict(ms)


def lora_in_matmul(kinds: dict) -> dict[str, dict]:
    """by_kind's rows in the kinds a kernel breakdown can tell apart: LoRA's matmuls with the rest."""
    out = {kind: EMPTY | row for kind, row in kinds.items() if kind != LORA}  # EMPTY: a floor saved before a key was added
    if LORA in kinds:
        matmul = out.get("matmul", EMPTY)
        out["matmul"] = {k: matmul[k] + kinds[LORA].get(k, 0) for k in EMPTY}
    return out


def floor_by_measured_kind(kinds: dict) -> dict[str, float]:
    """by_kind's floors (ms) in the kinds a kernel breakdown can tell apart."""
    return {kind: row["bound_ms"] for kind, row in lora_in_matmul(kinds).items()}


def step_floor(fn, *args, device, ceiling_tflops: float, lora_params=()) -> dict:
    """One call fn(*args) (a training step) counted on `device`, each op held to `ceiling_tflops`,
    to the copy bandwidth measured there, or to the card's exponential rate (hardware.exp_tera_per_s):
    {ceiling_tflops, bandwidth_gbs, exp_tera_per_s, kinds, ms, saved_bytes}, or {error} when it
    cannot be counted (a diagnosis: what was measured stands without it). saved_bytes: what
    autograd kept from the step's forward for its backward, the weights aside (count)."""
    try:
        bandwidth, exp_rate = hardware.bandwidth_gbs(device), hardware.exp_tera_per_s(device)
        counted = count(fn, *args, peak_tflops=ceiling_tflops, bandwidth_gbs=bandwidth, lora_params=lora_params,
                        exp_tera_per_s=exp_rate)
    except Exception as err:
        return {"error": describe(err)}
    kinds = by_kind(counted)
    return {"ceiling_tflops": ceiling_tflops, "bandwidth_gbs": bandwidth, "exp_tera_per_s": exp_rate, "kinds": kinds,
            "ms": sum(row["bound_ms"] for row in kinds.values()), "saved_bytes": counted.saved_bytes}


def vs_floor(floor: dict, breakdown: dict) -> dict[str, float]:
    """Measured ms over floor ms for the GEMM-like kinds a step_floor and a kernel breakdown
    (kernels.breakdown) both have; empty where either failed."""
    if "kinds" not in floor or "rows" not in breakdown:
        return {}
    floors, measured = floor_by_measured_kind(floor["kinds"]), measured_by_kind(breakdown["rows"])
    return {k: measured[k] / floors[k] for k in COMPUTE if measured.get(k) and floors.get(k)}


def table(kinds: dict, measured: dict | None = None, measured_total: float | None = None) -> str:
    """by_kind's floors as Markdown, with measured ms per kind (measured_by_kind) beside them."""
    lines = ["| kind | TFLOP | GB moved | G exps | floor ms | of it memory-bound | of it exp-bound | measured ms "
             "| measured / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def line(name, row, ms=None):
        ratio = f"{ms / row['bound_ms']:.2f}×" if ms and row["bound_ms"] else ""
        exps = f"{row['exps'] / 1e9:.3g}" if row["exps"] else ""
        lines.append(f"| {name} | {row['flops'] / 1e12:.3g} | {row['bytes'] / 1e9:.3g} | {exps} | {row['bound_ms']:.2f} "
                     f"| {row['memory_bound_ms']:.2f} | {row['exp_bound_ms']:.2f} "
                     f"| {'' if ms is None else f'{ms:.2f}'} | {ratio} |")

    got, merged = measured or {}, lora_in_matmul(kinds)
    for kind in COMPUTE:
        line(kind, merged.get(kind, EMPTY), got.get(kind) if measured else None)
        if kind == "matmul" and LORA in kinds:
            line("  of which LoRA", EMPTY | kinds[LORA])
    memory = merged.get(MEMORY, EMPTY)
    line(MEMORY + ", unfused", memory, got.get(MEMORY) if measured else None)
    fused = EMPTY | {"bytes": memory["fused_bytes"], "bound_ms": memory["fused_ms"], "memory_bound_ms": memory["fused_ms"]}
    line("  the same, fused between GEMM-like ops", fused, got.get(MEMORY) if measured else None)
    total = {k: sum(row[k] for row in merged.values()) for k in EMPTY}
    line("all kernels", total, measured_total)
    return "\n".join(lines)


def exp_note(kinds: dict, exp_tera_per_s: float | None) -> str:
    """A sentence on attention's exponentials: what they cost and what a kernel that does not
    overlap them with its matmuls would take; empty where there are none or no rate for them."""
    attention = kinds.get("attention", {})
    if not exp_tera_per_s or not attention.get("exps"):
        return ""
    return (f" Attention's softmax takes {attention['exps'] / 1e9:.3g} G exponentials, "
            f"{attention['exps'] / exp_tera_per_s / 1e9:.2f} ms at the special-function units' "
            f"{exp_tera_per_s:.3g} ×10¹² a second; a kernel that runs them after its matmuls instead of "
            f"beside them takes at least {attention['serial_ms']:.2f} ms, not {attention['bound_ms']:.2f}.")


def floor_table(floor: dict, breakdown: dict | None = None, note: str = "") -> str:
    """A step's floor ({ceiling_tflops, bandwidth_gbs, exp_tera_per_s, kinds} or {error}) as
    Markdown with what it is held to, beside a measured kernel breakdown (kernels.breakdown) where
    there is one."""
    if "error" in floor:
        return f"The floor count failed: {floor['error']}"
    rows = (breakdown or {}).get("rows")
    exp_rate = floor.get("exp_tera_per_s")
    held = (f"its bytes at the copy bandwidth measured here ({floor['bandwidth_gbs']:.3g} GB/s) or, in a fused "
            f"attention kernel, its exponentials at the card's {exp_rate:.3g} ×10¹² a second, whichever takes longest"
            if exp_rate else f"or its bytes at the copy bandwidth measured here ({floor['bandwidth_gbs']:.3g} GB/s), "
            "whichever takes longer (exponentials have no units of their own here)")
    return (f"Each kind's floor: one step's ops, each held to its FLOPs at the GEMM ceiling measured here "
            f"({floor['ceiling_tflops']:.3g} TFLOP/s), {held}. The memory-bound floor is "
            f"eager's unfused traffic, which fusion cuts{note}; the row under it has every memory-bound op "
            f"between two GEMM-like ones fused into one kernel.{exp_note(floor['kinds'], exp_rate)}\n\n"
            + table(floor["kinds"], rows and measured_by_kind(rows), rows and breakdown["kernel_ms"]))
