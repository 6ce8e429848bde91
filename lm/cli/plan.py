"""The command-line front of ``zoo plan``: the parser only; ``lm.parallel.plan`` runs once the arguments are good."""
from __future__ import annotations

from typing import Any

from lm.cli.common import argv_or_sys
from zoo.cli.errors import parse_tool_args, tool_parser


def build_parser() -> Any:
    """The ``zoo plan`` parser."""
    parser = tool_parser("zoo plan", "Plan a sharded LM run: per-device memory, FLOPs and step time, from the "
                         "meta-device model.")
    parser.add_argument("model", type=str, help="registered LM name, e.g. gemma2-27b, llama2-70b, chinchilla-70b")
    parser.add_argument("--devices", type=int, required=True, help="devices per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (world size = nodes x devices)")
    parser.add_argument("--seq_len", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", type=int, required=True, help="global batch in sequences")
    parser.add_argument("--strategy", type=str, default="fsdp", help="ddp | fsdp (FULL_SHARD) | hybrid")
    parser.add_argument("--activation_checkpointing", action="store_true", help="per-block checkpointing")
    parser.add_argument("--precision", type=str, default="bf16-mixed", help="bf16-mixed | 32-true")
    parser.add_argument("--chip", type=str, default="h100",
                        help="accelerator whose memory and peak FLOP/s are assumed: h100, h200, a100, l40s, ... "
                             "(lm.parallel.plan.CHIPS; an unknown name is refused with the full list)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for step time")
    parser.add_argument("--memory_gb", type=float, default=None, help="device memory in GiB (default: the chip's)")
    parser.add_argument("--attn_backend", type=str, default=None, help="eager | sdpa | flex (default: GPU choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Plan a sharded LM run: per-device memory, FLOPs and step time, from the meta-device model.

    ``zoo plan <model> --devices D ...`` prints the plan (or one JSON line with ``--json``).
    """
    args = parse_tool_args(build_parser(), argv_or_sys(argv), "plan")
    if args is None:
        return 2
    from lm.parallel.plan import run_plan

    return run_plan(args)


if __name__ == "__main__":
    raise SystemExit(main())
