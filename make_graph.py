#!/usr/bin/env python3
"""Write the autograd graph of one DenseNet forward + cross-entropy loss as Graphviz DOT.

Usage: make_graph.py [--depth 40] [--growth 12] [--no-bottleneck] [--out graph]
Writes graph.dot, and renders graph.svg (or --format) when Graphviz `dot` is installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from densenet import densenet_cifar


def quote(text: str) -> str:
    """Quote a string as a DOT identifier/label."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def autograd_dot(loss: torch.Tensor, model: nn.Module) -> str:
    """DOT text for the backward graph of loss; parameter leaves carry their module names."""
    names = {id(p): name for name, p in model.named_parameters()}
    ids: dict[int, str] = {}  # id(grad_fn) -> DOT node id
    # Each grad_fn seen, kept alive: torch 2.4 frees a node's Python object once nothing
    # holds it and makes a new one on the next access, so a freed id may name another node.
    kept = []
    lines = [
        "digraph autograd {",
        '  graph [rankdir=TB, fontname="Helvetica"];',
        '  node [shape=box, style=filled, fillcolor=white, fontsize=10, fontname="Helvetica"];',
        f"  loss [label={quote(f'loss {tuple(loss.shape)}')}, fillcolor=darkolivegreen1];",
    ]
    edges = []

    def node_id(fn) -> str:
        """Return fn's DOT id, emitting its node line the first time it is seen."""
        if id(fn) not in ids:
            kept.append(fn)
            ids[id(fn)] = f"n{len(ids)}"
            param = getattr(fn, "variable", None)  # AccumulateGrad: a leaf tensor
            if param is not None:
                name = names.get(id(param), "(input)")
                label, color = f"{name}\n{tuple(param.shape)}", "lightblue"
            else:
                label, color = type(fn).__name__, "white"
            lines.append(f"  {ids[id(fn)]} [label={quote(label)}, fillcolor={color}];")
        return ids[id(fn)]

    edges.append(f"  {node_id(loss.grad_fn)} -> loss;")
    stack, seen = [loss.grad_fn], {id(loss.grad_fn)}
    while stack:  # iterative DFS: the graph of a deep DenseNet is too deep to recurse
        fn = stack.pop()
        for child, _ in fn.next_functions:
            if child is None:
                continue
            edges.append(f"  {node_id(child)} -> {node_id(fn)};")  # data flows child -> fn
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return "\n".join(lines + edges + ["}"]) + "\n"


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse an input shape like '3x32x32' into (channels, height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}")
    c, h, w = map(int, parts)
    return c, h, w


def shell_line(command: list[str]) -> str:
    """A command quoted for this platform's shell (cmd.exe on Windows, else POSIX sh)."""
    return subprocess.list2cmdline(command) if os.name == "nt" else shlex.join(command)


def build_parser() -> argparse.ArgumentParser:
    """The command line: the DenseNet's shape, the input shape, and the output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=40, help="network depth L")
    parser.add_argument("--growth", type=int, default=12, help="growth rate k")
    parser.add_argument(
        "--no-bottleneck",
        action="store_true",
        help="plain DenseNet layers (no 1x1 conv)",
    )
    parser.add_argument(
        "--compression",
        type=float,
        default=None,
        help="transition compression theta (default: 0.5, or 1.0 with --no-bottleneck "
        "as in the original DenseNet)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=10, help="classifier outputs (default 10)"
    )
    parser.add_argument(
        "--input-shape",
        type=parse_shape,
        default=(3, 32, 32),
        help="CxHxW (default 3x32x32)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("graph"),
        help="output path stem (default: graph)",
    )
    parser.add_argument(
        "--format",
        default="svg",
        help="format Graphviz renders to (svg, pdf, png; default svg)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    bottleneck = not args.no_bottleneck
    compression = args.compression
    if compression is None:
        compression = 0.5 if bottleneck else 1.0
    channels, height, width = args.input_shape
    try:
        model = densenet_cifar(
            args.depth,
            args.growth,
            bottleneck=bottleneck,
            compression=compression,
            num_classes=args.num_classes,
            in_channels=channels,
        )
    except ValueError as e:  # e.g. a depth that does not fit three equal blocks
        parser.error(str(e))
    model.train()  # the graph as seen during training (batch-norm with batch statistics)
    x = torch.randn(2, channels, height, width)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]) % args.num_classes)

    stem = args.out.with_suffix("") if args.out.suffix == ".dot" else args.out
    dot_path = stem.with_name(stem.name + ".dot")
    try:
        dot_path.parent.mkdir(parents=True, exist_ok=True)
        dot_path.write_text(autograd_dot(loss, model))
    except OSError as e:  # e.g. --out inside a file, or in a read-only folder
        print(f"make_graph.py: error: cannot write {dot_path} ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {dot_path}")

    out_path = stem.with_name(f"{stem.name}.{args.format}")
    dot = shutil.which("dot")
    command = [dot or "dot", f"-T{args.format}", str(dot_path), "-o", str(out_path)]
    if dot is None:
        print(
            f"Graphviz 'dot' not found; render with: {shell_line(command)}\n"
            "(install Graphviz: apt-get install graphviz, brew install graphviz, "
            "or conda install graphviz)"
        )
        return 0
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"make_graph.py: error: dot failed: {result.stderr.strip()}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
