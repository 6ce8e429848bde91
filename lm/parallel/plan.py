"""``zoo plan``: per-device memory, FLOPs and step time of a (sharded) LM training run, from the meta-device model.

Nothing is allocated: the model is built with ``zoo.create(name, device="meta")``; parameter and optimizer-state
figures come from its real tensors, activations from a per-block count of what our Transformer saves for backward.

Assumptions (printed with ``--help`` and checked in tests/test_plan.py against real CPU allocations):
- Parameters and gradients are fp32 under both precisions (Lightning's ``bf16-mixed`` keeps fp32 master weights and
  computes in bf16 under autocast); AdamW keeps two fp32 moments per parameter plus a 4-byte ``step`` per tensor.
- bf16 compute copy: under DDP, autocast caches a bf16 copy of every matmul weight from forward to backward; under
  FSDP (FULL_SHARD, ``param_dtype=bf16``, ``reduce_dtype=fp32``) only the gathered units live: two units' bf16
  parameters (current + prefetched) and one unit's fp32 gradients before reduce-scatter; a unit is a block, or the
  root (embeddings, final norm, head).
- DDP also holds fp32 gradient buckets as large as the gradients (``gradient_as_bucket_view=False``, the default).
- FSDP shards every tensor's first dimension over the world, padded to ``ceil(dim0 / world)`` rows (FSDP2).
  ``hybrid`` shards within a node (over ``devices``) and replicates across nodes (HYBRID_SHARD).
- Activations: what one block saves for backward with the attention backend our model picks on a GPU (FlexAttention
  with a soft-cap, SDPA otherwise: q, k, v, output and log-sum-exp, no S x S matrix; ``eager`` saves the S x S scores
  and probabilities), plus embeddings, final norm, logits and the float32 log-softmax of the loss. With activation
  checkpointing each block keeps only its input; one block's activations return while it is recomputed.
- Step time = training FLOPs per step / (MFU x peak bf16 FLOP/s x world); FLOPs per token as the training loop's MFU
  logger counts them (6 x matmul parameters + causal attention).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import zoo
from lm.parallel.flops import mfu_flops_per_token, matmul_params
from lm.parallel.hardware import PEAK_BF16_FLOPS
from zoo.models import attention as A

# Chip -> (key into lm.parallel.hardware.PEAK_BF16_FLOPS, the one table of dense bf16 datasheet peaks; memory in GiB from
# the vendors' datasheets: H100 SXM 80 GB, H200 141 GB, A100 80 GB variant, L40S 48 GB, ...).
CHIPS: dict[str, tuple[str, float]] = {
    "h100": ("H100", 80.0), "h100-pcie": ("H100 PCIe", 80.0), "h200": ("H200", 141.0), "a100": ("A100", 80.0),
    "l40s": ("L40S", 48.0), "l4": ("L4", 24.0), "a10g": ("A10G", 24.0), "rtx4090": ("RTX 4090", 24.0),
    "v100": ("V100", 32.0), "t4": ("T4", 16.0),
}
STRATEGIES = ("ddp", "fsdp", "hybrid")
PRECISIONS = ("bf16-mixed", "32-true")
HEADROOM = 0.9  # a plan "fits" under 90% of device memory: CUDA context, allocator fragmentation, NCCL buffers
GIB = 2.0 ** 30


@dataclass(frozen=True)
class StateBytes:
    """Per-device bytes of model state: fp32 parameters, fp32 gradients, AdamW state, bf16 copy and comm buffers."""

    params: int
    grads: int
    optimizer: int
    compute_copy: int
    buffers: int

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.params + self.grads + self.optimizer + self.compute_copy + self.buffers


def _shard_numel(p: torch.Tensor, shards: int) -> int:
    # FSDP2 pads dim 0 to a multiple of the shard count; every rank allocates the padded chunk.
    if shards == 1 or p.dim() == 0:
        return p.numel()
    rows = math.ceil(p.shape[0] / shards)
    return rows * (p.numel() // p.shape[0])


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


def state_bytes(model: nn.Module, strategy: str, shards: int, precision: str) -> StateBytes:
    """Per-device bytes of parameters, gradients and AdamW state for ``model`` sharded ``shards`` ways (1: DDP)."""
    params = _unique_params(model)
    local = sum(_shard_numel(p, shards) for p in params)
    n_tensors = len(params)
    param_b = 4 * local  # fp32 master weights under both precisions
    grad_b = 4 * local
    optim_b = 8 * local + 4 * n_tensors  # exp_avg, exp_avg_sq (fp32) and a float32 `step` per tensor
    mixed = precision == "bf16-mixed"
    if strategy == "ddp":
        compute = 2 * matmul_params(model, getattr(model.config, "vocab_size", None)) if mixed else 0
        buffers = 4 * sum(p.numel() for p in params)  # gradient buckets
    else:
        units = [_unique_params(b) for b in model.layers]
        in_blocks = {id(p) for u in units for p in u}
        units.append([p for p in params if id(p) not in in_blocks])  # root unit: embeddings, final norm, head
        largest = max(sum(p.numel() for p in u) for u in units)
        compute = 2 * largest * (2 if mixed else 4)  # current + prefetched unit, all-gathered
        buffers = 4 * largest  # one unit's unsharded fp32 gradients before reduce-scatter
    return StateBytes(param_b, grad_b, optim_b, compute, buffers)


def resolve_backend(config: Any, device: str = "cuda") -> str:
    """The attention backend our Transformer uses for training on ``device`` (see zoo.models.attention)."""
    with torch.enable_grad():
        return A.pick_backend(config.attn_backend, cap=config.attn_softcap, relative=config.positions == "relative",
                              cached=False, device=torch.device(device))


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes saved for backward in one training forward, without and with per-block activation checkpointing."""

    per_block: int
    outside_blocks: int
    without_checkpointing: int
    with_checkpointing: int


def _norm_bytes(n: int, d: int, unit_offset: bool) -> int:
    # RMSNorm works in float32 whatever the activation dtype: input (or its fp32 copy), normalised h, rsqrt, and the
    # (1 + w) scale of a unit-offset norm (Gemma); a plain w scale (Llama, Gopher) is the parameter itself, no copy.
    return 4 * (2 * n * d + n + (d if unit_offset else 0))


def block_activation_bytes(config: Any, batch: int, seq_len: int, precision: str, backend: str) -> int:
    """Bytes one Transformer block saves for backward for ``batch`` sequences of ``seq_len`` tokens."""
    c, b, t = config, batch, seq_len
    n, d, f, H, K, hd = b * t, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim
    a = 2 if precision == "bf16-mixed" else 4  # bytes of a matmul input under autocast
    norms = 2 + (2 if c.post_norms else 0)
    total = norms * _norm_bytes(n, d, c.norm_unit_offset)
    total += 2 * a * n * d  # the pre-norm outputs, saved as the q/k/v and FFN matmul inputs
    if a != 4:
        total += 4 * a * t * hd  # RoPE cos/sin cast to bf16 for q and for k, per layer
    total += c.dense_ffn().saved_activations * a * n * f  # gated: gate, act(gate), up, product; MLP: up, act(up)
    window = c.window if "local" in c.layer_pattern else None
    keys = min(t, window) if backend != "eager" and window else t
    if backend == "eager":
        # q and the repeated k, v; scores (soft-capped copy), float32 softmax, probabilities in the compute dtype;
        # the [H hd] attention output is a fresh copy for o_proj; the boolean mask.
        total += 3 * a * n * H * hd + a * n * H * hd
        total += b * H * t * t * ((a if c.attn_softcap is not None else 0) + 4 + (a if a != 4 else 0)) + t * t
    else:
        # Fused kernels (SDPA flash / FlexAttention): q, k, v, output (shared with o_proj's input) and float32 LSE.
        total += a * (2 * n * H * hd + 2 * n * K * hd) + 4 * b * H * t
        if c.positions == "relative":
            # Transformer-XL bias: an S x S additive bias per head (and its int64 distance index) goes to the kernel.
            total += b * H * t * keys * (a + 4) + 8 * t * keys + 4 * n * H * hd
        elif window:
            total += t * t  # the boolean window mask
    return total


def activation_bytes(config: Any, batch: int, seq_len: int, precision: str, backend: str) -> ActivationBytes:
    """Activation bytes of one training forward + loss (see module doc), with and without checkpointing."""
    c = config
    n, d, V = batch * seq_len, c.d_model, c.vocab_size
    a = 2 if precision == "bf16-mixed" else 4
    per_block = block_activation_bytes(c, batch, seq_len, precision, backend)
    # Input ids and targets (int64), final norm, its output as the head's input, soft-capped logits, log-softmax.
    outside = (16 * n + _norm_bytes(n, d, c.norm_unit_offset) + a * n * d
               + (a * n * V if c.final_softcap is not None else 0) + 4 * n * V)
    if a == 4:
        outside += 2 * 4 * seq_len * c.head_dim if c.positions == "rope" else 0  # one cos/sin pair for all layers
    # Checkpointing keeps each block's input (float32: the residual stream is not autocast); the block being
    # recomputed in backward saves everything again except that input, which it shares.
    residual = 4 * n * d
    return ActivationBytes(per_block, outside, outside + c.n_layers * per_block,
                           outside + c.n_layers * residual + per_block - residual)


@dataclass(frozen=True)
class Plan:
    """Everything ``zoo plan`` prints for one model, layout and chip."""

    model: str
    params: int
    world: int
    shards: int
    strategy: str
    precision: str
    activation_checkpointing: bool
    micro_batch: int
    seq_len: int
    attn_backend: str
    state: StateBytes
    activations: ActivationBytes
    flops_per_token: float
    flops_per_step: float
    chip: str
    mfu: float
    step_time_s: float
    memory_gb: float
    fits: dict[str, bool]

    @property
    def activation_bytes(self) -> int:
        """Activation bytes under the chosen checkpointing setting."""
        a = self.activations
        return a.with_checkpointing if self.activation_checkpointing else a.without_checkpointing

    @property
    def total_bytes(self) -> int:
        """Per-device total of the chosen plan."""
        return self.state.total + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as integers)."""
        d = asdict(self)
        d.update(activation_bytes=self.activation_bytes, total_bytes=self.total_bytes,
                 state_total_bytes=self.state.total)
        return d


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"--{key}={value} must be a positive integer")


def plan(model: str, devices: int, seq_len: int, batch: int, nodes: int = 1, strategy: str = "fsdp",
         activation_checkpointing: bool = False, precision: str = "bf16-mixed", chip: str = "h100",
         mfu: float = 0.4, memory_gb: float | None = None, attn_backend: str | None = None,
         **overrides: Any) -> Plan:
    """Plan a training run of registered LM ``model`` (global ``batch`` sequences) on ``nodes`` x ``devices``."""
    _check_positive(devices=devices, nodes=nodes, batch=batch, seq_len=seq_len)
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy={strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    if chip not in CHIPS:
        raise ValueError(f"--chip={chip!r}; expected one of {', '.join(CHIPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu={mfu} must be in (0, 1]; 0.4 is typical of a well-tuned dense LM run")
    if memory_gb is not None and memory_gb <= 0:
        raise ValueError(f"--memory_gb={memory_gb} must be positive")
    world = devices * nodes
    if batch % world:
        raise ValueError(f"--batch={batch} is not divisible by the world size {world} (= nodes {nodes} x devices "
                         f"{devices}); use a multiple of {world}")
    net = zoo.create(model, device="meta", **overrides)
    config = getattr(net, "config", None)
    if config is None or not hasattr(config, "max_seq_len"):
        raise ValueError(f"model {model!r} is not a zoo language model; pick a Transformer name from zoo.available()")
    if not hasattr(net, "layers"):
        # A multimodal model adds an image encoder (its own FSDP unit) and image-token activations this memory model
        # does not count; a plan without them would understate memory, so none is given.
        raise ValueError(f"model {model!r} is a multimodal model ({type(net).__name__}: image encoder + decoder); "
                         "zoo plan sizes decoder-only language models: plan its decoder by its Transformer name and "
                         "add the encoder's memory")
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq_len={seq_len} exceeds the max_seq_len={config.max_seq_len} of model {model!r}; "
                         "use a shorter sequence")
    backend = attn_backend or resolve_backend(config)
    micro = batch // world
    shards_of = {"ddp": 1, "fsdp": world, "hybrid": devices}
    acts = activation_bytes(config, micro, seq_len, precision, backend)
    per_tok = mfu_flops_per_token(net, seq_len)
    per_step = per_tok * batch * seq_len
    key, default_mem = CHIPS[chip]
    peak = dict(PEAK_BF16_FLOPS)[key]
    memory = default_mem if memory_gb is None else float(memory_gb)
    fits = {}
    for strat in ("ddp", "fsdp"):
        st = state_bytes(net, strat, shards_of[strat], precision).total
        fits[strat] = st + acts.without_checkpointing <= HEADROOM * memory * GIB
        fits[strat + "+ac"] = st + acts.with_checkpointing <= HEADROOM * memory * GIB
    return Plan(model, int(net.num_params()), world, shards_of[strategy], strategy, precision,
                activation_checkpointing, micro, seq_len, backend,
                state_bytes(net, strategy, shards_of[strategy], precision), acts, per_tok, per_step, chip, mfu,
                per_step / (mfu * peak * world), memory, fits)


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f} GiB"


def format_plan(p: Plan) -> str:
    """The human-readable table (under 100 columns)."""
    s, a = p.state, p.activations
    ac = "on" if p.activation_checkpointing else "off"
    lines = [
        f"{p.model}: {p.params / 1e9:.2f}B parameters, {p.world} devices, {p.strategy} (sharded {p.shards}-way), "
        f"{p.precision}",
        f"micro-batch {p.micro_batch} x seq_len {p.seq_len} per device, attention backend {p.attn_backend}",
        "",
        "per-device memory",
        f"  parameters (fp32)                  {_gib(s.params)}",
        f"  gradients (fp32)                   {_gib(s.grads)}",
        f"  optimizer (AdamW, 2 x fp32)        {_gib(s.optimizer)}",
        f"  compute copy (gathered / autocast) {_gib(s.compute_copy)}",
        f"  comm buffers                       {_gib(s.buffers)}",
        f"  activations, no checkpointing      {_gib(a.without_checkpointing)}",
        f"  activations, per-block checkpoint  {_gib(a.with_checkpointing)}",
        f"  total (checkpointing {ac:3s})          {_gib(p.total_bytes)}   of {p.memory_gb:g} GiB on {p.chip}",
        "",
        f"FLOPs per token {p.flops_per_token:.3e}, per step {p.flops_per_step:.3e}",
        f"step time at {p.mfu:.0%} MFU: {p.step_time_s:.3f} s "
        f"({p.micro_batch * p.world * p.seq_len / p.step_time_s:,.0f} tokens/s)",
        "",
        f"fits in {HEADROOM:.0%} of {p.memory_gb:g} GiB:  "
        + "  ".join(f"{k}: {'yes' if v else 'no'}" for k, v in p.fits.items()),
    ]
    return "\n".join(lines)


def run_plan(args: Any) -> int:
    """Print the plan for the arguments ``lm.cli.plan`` parsed (a user's mistake: one line, exit 2)."""
    from zoo.errors import user_error_line

    try:
        result = plan(**{k: v for k, v in vars(args).items() if k not in ("json", "__path__")})
    except Exception as e:  # a user's mistake (bad value, unknown model): one line, no traceback
        line = user_error_line("plan", e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()) if args.json else format_plan(result))
    return 0
