"""python -m conversion SRC OUT [--revision REV] [--dtype bfloat16|float32]

SRC: a Hugging Face Hub repo id (downloaded first) or a local checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conversion.convert import ConversionError, convert
from conversion.resolve import ModelNotFoundError, fetch_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hub repo id (e.g. nvidia/llama-nemotron-embed-vl-1b-v2) or local directory")
    parser.add_argument("out", type=Path, help="output directory for the Flax parameters")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="stored dtype (default: the checkpoint's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        src, source, revision = fetch_source(args.src, args.revision)
        manifest = convert(src, args.out, dtype=args.dtype, source=source, revision=revision,
                           progress=not args.quiet)
    except (ConversionError, ModelNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest[k] for k in ("source", "revision", "parameters", "dtype")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
