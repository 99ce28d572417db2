"""python -m indexer embed INPUT... --output INDEX [--server URL ...]
python -m indexer ray INPUT... --output INDEX [--sink parquet|lance] [--checkpoint PATH | --server URL ...]
python -m indexer search --index INDEX [--server URL | --checkpoint PATH] "query" [-k 5]

Exit status of `embed` and `ray`: 0 done, 1 an error stopped it (or, for `embed`, id collisions: nothing embedded),
2 some items failed (a rerun retries them), 130 interrupted by Ctrl-C (what was embedded is stored; a rerun resumes).
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

    _ray_parser(sub, common)

    s = sub.add_parser("search", help="the items of an index most similar to a text query")
    s.add_argument("query")
    s.add_argument("--index", "-i", type=Path, required=True,
                   help="an index written by `embed` or `ray` (a Parquet directory, or a LanceDB database)")
    s.add_argument("-k", type=_positive, default=5, help="how many results (default 5)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    common(s)
    s.add_argument("--checkpoint", metavar="PATH",
                   help="embed the query in this process with this checkpoint instead of asking a server")
    s.add_argument("--table", default="pages", help="LanceDB table (default pages)")
    return p


def _ray_parser(sub, common) -> None:
    from indexer.lance import DEFAULT_INDEX_MIN_ROWS

    r = sub.add_parser("ray", help="embed a corpus on Ray Data (a local instance, or the cluster at $RAY_ADDRESS)",
                       description="INPUT: as for `embed`, or a URI that pyarrow.fs reads (s3://, gs://, hdfs://, "
                                   "file://). Embeds in process on an actor pool (one actor per GPU when the "
                                   "cluster has GPUs), or with running servers when --server is given. Running "
                                   "again with the same output resumes: ids already stored are skipped.")
    r.add_argument("inputs", nargs="+", metavar="INPUT")
    r.add_argument("--output", "-o", required=True,
                   help="a Parquet index directory (--sink parquet), or a LanceDB database (--sink lance)")
    r.add_argument("--sink", choices=("parquet", "lance"), default=None,
                   help="default: lance when the output ends in .lancedb, else parquet")
    r.add_argument("--table", default="pages", help="LanceDB table (default pages)")
    r.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint to embed with in process (default: $EMBED_MODEL, else the Hub model)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on GPUs, float32 on CPU")
    common(r)
    r.add_argument("--batch-size", type=_positive, default=16, help="inputs per embedding call (default 16)")
    r.add_argument("--actors", type=_positive,
                   help="embedding actors (default: one per GPU; 1 on CPU; 2 per server)")
    r.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    r.add_argument("--cpus-per-actor", type=float, help="default: 1 in process, 0.25 with servers")
    r.add_argument("--prepare-batch-size", type=_positive, default=8,
                   help="images/pages per preprocessing task call (default 8)")
    r.add_argument("--chunk-size", type=_positive, default=1024,
                   help="rows per Parquet part or LanceDB commit, the most a crash can lose (default 1024)")
    r.add_argument("--max-side", type=_positive, default=DEFAULT_MAX_SIDE,
                   help=f"long side in pixels of rendered PDF pages and of the largest images (default "
                        f"{DEFAULT_MAX_SIDE})")
    r.add_argument("--max-tokens-text", type=_positive, default=8192,
                   help="in process: texts are cut at the end to this many tokens, as the server does (default 8192)")
    r.add_argument("--max-tokens-image", type=_positive, default=2048,
                   help="in process: the token limit of an image input (default 2048)")
    r.add_argument("--int8", action="store_true", help="LanceDB: also store int8 vectors")
    r.add_argument("--binary", action="store_true", help="LanceDB: also store 1-bit vectors (D/8 bytes)")
    r.add_argument("--index-min-rows", type=int, default=DEFAULT_INDEX_MIN_ROWS,
                   help=f"LanceDB: build the IVF_PQ index once the table has this many rows (default "
                        f"{DEFAULT_INDEX_MIN_ROWS}; at least 256). Smaller tables are searched exactly")
    r.add_argument("--max-retries", type=int, default=8, help="with servers: retries of a request (default 8)")
    r.add_argument("--timeout", type=float, default=300.0, help="with servers: seconds per request (default 300)")
    r.add_argument("--id-field", default="id", help="id field of JSONL/Parquet texts (default id)")
    r.add_argument("--text-field", default="text", help="text field of JSONL/Parquet texts (default text)")
    r.add_argument("--report", type=Path, help="also write the final report as JSON to this file")
    bar = r.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    servers = args.server or [DEFAULT_SERVER]
    try:
        if args.command == "embed":
            return _embed(args, servers)
        if args.command == "ray":
            return _ray(args)
        if args.checkpoint or _is_lance(args.index):
            from indexer.query import search_index

            results = search_index(args.index, args.query, servers=servers, k=args.k, model=args.model,
                                   api_key=args.api_key, checkpoint=args.checkpoint, table=args.table)
        else:
            results = asyncio.run(search(args.index, args.query, servers=servers, k=args.k, model=args.model,
                                         api_key=args.api_key))
    except (RequestFailed, SourceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['id']}" + (f"  {r['text'][:60]!r}" if r.get("text") else ""))
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


def _is_lance(index: Path) -> bool:
    from indexer.lance import is_lance_uri

    return is_lance_uri(str(index))


def _ray(args: argparse.Namespace) -> int:
    try:
        from indexer.ray_pipeline import RayOptions, run_ray
    except ImportError as e:
        print(f"error: {e}; `python -m indexer ray` needs the indexer extra: pip install '.[indexer]'",
              file=sys.stderr)
        return 1
    from conversion.resolve import ModelNotFoundError

    sink = args.sink or ("lance" if _is_lance(Path(args.output)) else "parquet")
    opts = RayOptions(output=args.output, sink=sink, table=args.table, checkpoint=args.checkpoint, dtype=args.dtype,
                      servers=args.server or (), model=args.model, api_key=args.api_key, timeout_s=args.timeout,
                      max_retries=args.max_retries, batch_size=args.batch_size, actors=args.actors,
                      gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                      prepare_batch_size=args.prepare_batch_size, chunk_size=args.chunk_size,
                      max_side=args.max_side, id_field=args.id_field, text_field=args.text_field,
                      max_tokens_text=args.max_tokens_text, max_tokens_image=args.max_tokens_image, int8=args.int8,
                      binary=args.binary, index_min_rows=args.index_min_rows, progress=args.progress)
    from indexer.ray_pipeline import RayReport

    report = RayReport(output=args.output)
    try:
        run_ray(args.inputs, opts, report)
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(report.summary())
        print(f"interrupted: {report.items} items embedded by this run are stored in {args.output}; run the same "
              f"command again to resume (ids already stored are skipped)", file=sys.stderr)
        return 130
    print(report.summary())
    if args.report:
        write_report(report, args.report)
    return 0 if report.failed == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
