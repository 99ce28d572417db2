"""python -m indexer embed INPUT... --output INDEX [--server URL ...]
python -m indexer search --index INDEX [--server URL] "query" [-k 5]

Exit status of `embed`: 0 done, 1 an error stopped it (or id collisions: nothing embedded), 2 some items failed
(a rerun retries them), 130 interrupted by Ctrl-C (what was embedded is stored; a rerun resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from indexer.client import RequestFailed
from indexer.embed import EmbedOptions, Report, run_embed, write_report
from indexer.search import search
from indexer.sources import DEFAULT_MAX_SIDE, SourceError

DEFAULT_SERVER = "http://localhost:3000"


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m indexer",
                                description="Embed documents into a Parquet index with NIM-compatible embedding "
                                            "servers, and search it.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--server", action="append", metavar="URL",
                       help=f"embedding server (repeat for several); default {DEFAULT_SERVER}")
        q.add_argument("--model", help="model id to request (default: what the first server's /v1/models lists)")
        q.add_argument("--api-key", default=os.environ.get("NVIDIA_API_KEY"),
                       help="sent as a bearer token (default: $NVIDIA_API_KEY; none for a local server)")

    e = sub.add_parser("embed", help="embed images, PDF pages and texts into a resumable Parquet index",
                       description="INPUT: a directory (its images and PDFs, recursively), an image or PDF file, or "
                                   "a JSONL/Parquet file of texts. Running again with the same output resumes: ids "
                                   "already in the index are skipped.")
    e.add_argument("inputs", nargs="+", metavar="INPUT")
    e.add_argument("--output", "-o", type=Path, required=True,
                   help="the index: a directory of Parquet part files (e.g. index.parquet)")
    common(e)
    e.add_argument("--batch-size", type=_positive, default=16, help="inputs per request (default 16)")
    e.add_argument("--concurrency", type=_positive, default=4,
                   help="requests in flight over all servers (default 4)")
    e.add_argument("--chunk-size", type=_positive, default=1024,
                   help="rows per Parquet part file, the most a crash can lose (default 1024)")
    e.add_argument("--max-side", type=_positive, default=DEFAULT_MAX_SIDE,
                   help=f"long side in pixels of rendered PDF pages and of the largest images sent "
                        f"(default {DEFAULT_MAX_SIDE})")
    e.add_argument("--max-retries", type=int, default=8,
                   help="retries of a request on 429/503/connection errors (default 8)")
    e.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    e.add_argument("--workers", type=_positive, default=4, help="threads preparing images (default 4)")
    e.add_argument("--id-field", default="id", help="id field of JSONL/Parquet texts (default id)")
    e.add_argument("--text-field", default="text", help="text field of JSONL/Parquet texts (default text)")
    e.add_argument("--root", type=Path,
                   help="file ids are paths relative to this directory (default: the root recorded in the index "
                        "when resuming, else the deepest directory holding every directory, image and PDF input)")
    e.add_argument("--allow-duplicate-ids", action="store_true",
                   help="when one id names different items (two JSONL records, ...), keep the first and go on; "
                        "default: report them and stop before embedding anything (exit status 1)")
    e.add_argument("--report", type=Path, help="also write the final report as JSON to this file")
    bar = e.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser("search", help="the items of an index most similar to a text query")
    s.add_argument("query")
    s.add_argument("--index", "-i", type=Path, required=True, help="an index written by `embed`")
    s.add_argument("-k", type=_positive, default=5, help="how many results (default 5)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    common(s)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    servers = args.server or [DEFAULT_SERVER]
    try:
        if args.command == "embed":
            return _embed(args, servers)
        results = asyncio.run(search(args.index, args.query, servers=servers, k=args.k, model=args.model,
                                     api_key=args.api_key))
    except (RequestFailed, SourceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['id']}")
    return 0


def _embed(args: argparse.Namespace, servers: list[str]) -> int:
    opts = EmbedOptions(servers=servers, output=args.output, model=args.model, batch_size=args.batch_size,
                        concurrency=args.concurrency, chunk_size=args.chunk_size, max_side=args.max_side,
                        max_retries=args.max_retries, timeout_s=args.timeout, workers=args.workers,
                        id_field=args.id_field, text_field=args.text_field, api_key=args.api_key,
                        progress=args.progress, root=args.root, allow_duplicate_ids=args.allow_duplicate_ids)
    report = Report(output=str(args.output))
    try:
        # On Ctrl-C asyncio.run cancels the run, which stores what was embedded, then raises KeyboardInterrupt.
        asyncio.run(run_embed(args.inputs, opts, report))
    except KeyboardInterrupt:
        report.interrupted = True
        _finish(report, args.report)
        print(f"interrupted: {report.items} items embedded by this run are stored in {args.output}; run the same "
              f"command again to resume (ids already in the index are skipped)", file=sys.stderr)
        return 130
    except RequestFailed:
        if report.items:
            _finish(report, args.report)
        raise
    _finish(report, args.report)
    if report.collisions and not args.allow_duplicate_ids:
        print(f"error: {len(report.collisions)} ids name more than one item; make the ids unique, or pass "
              f"--allow-duplicate-ids to keep the first item of each", file=sys.stderr)
        return 1
    return 0 if report.failed == 0 else 2


def _finish(report: Report, path: Path | None) -> None:
    print(report.summary(), flush=True)
    if path:
        write_report(report, path)


if __name__ == "__main__":
    sys.exit(main())
