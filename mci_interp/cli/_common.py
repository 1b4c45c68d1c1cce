"""What every command that loads a model shares: its arguments and the load itself."""

from __future__ import annotations

import argparse
import sys
import time


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registry name (see `mci models`), local HF directory or hub id",
    )
    p.add_argument(
        "--adapter", default=None, help="LoRA adapter (directory or hub id) merged on load"
    )
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub --model (results are keyed by the commit)",
    )
    p.add_argument(
        "--adapter-revision", default=None, help="branch, tag or commit of a hub --adapter"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="auto: the checkpoint's own dtype; bfloat16 is ~3x faster on CPUs with AMX and the "
        "usual choice on GPUs",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu (default), cuda, cuda:N or mps; 'auto' spreads a model too large for one GPU "
        "over all of them (accelerate's device_map)",
    )


def load_model_from_args(args):
    """The model of ``add_model_args``' arguments, with one line on stderr saying what loaded."""
    from mci_interp.models import load_model

    t0 = time.perf_counter()
    device = getattr(args, "device", None)
    where = {"device_map": "auto"} if device == "auto" else {"device": device}
    m = load_model(
        args.model,
        adapter=args.adapter,
        adapter_revision=getattr(args, "adapter_revision", None),
        revision=getattr(args, "revision", None),
        dtype=args.dtype,
        **where,
    )
    dtype = str(m.dtype).removeprefix("torch.")
    print(
        f"loaded {m.name} ({m.n_layers} layers, d_model {m.d_model}, {dtype}, {m.device}) in "
        f"{time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return m
