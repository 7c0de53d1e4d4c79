"""``attnkit serve``: the explanation service and dashboard; ``serve export`` and ``serve baseline`` on its store."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from attnkit.cli.registry import UserError, subcommand

if TYPE_CHECKING:
    from attnkit.serve.service import ServeConfig

DEFAULT_MODELS = ("minilm", "digits-vit")


def _model_spec(value: str) -> tuple[str, str]:
    name, sep, source = value.partition("=")
    if not name or (sep and not source):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=DIR (e.g. minilm or mybert=./ckpt), got {value!r}")
    return name, source or name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``attnkit serve`` flags and its ``export`` and ``baseline`` subcommands."""
    from attnkit.serve.store import DEFAULT_DB

    parser.add_argument("--db", default=DEFAULT_DB, help=f"SQLAlchemy URL or SQLite file path (default ./{DEFAULT_DB})")
    sub = parser.add_subparsers(dest="serve_command", metavar="{export,baseline}")
    ex = sub.add_parser("export", help="write the store's records to JSON Lines or Parquet")
    ex.add_argument("out", type=Path, help="output file (.jsonl or .parquet)")
    ex.add_argument("--format", choices=("jsonl", "parquet"), default=None, help="default: from the suffix")
    ex.add_argument("--model", default=None, help="only this model's records")
    ex.add_argument("--since", default=None, help="ISO 8601 or epoch seconds, inclusive")
    ex.add_argument("--until", default=None, help="ISO 8601 or epoch seconds, exclusive")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ex.add_argument("--db", default=argparse.SUPPRESS, help="as for serve")
    bl = sub.add_parser("baseline", help="record a reference window of attention health for drift detection")
    bl.add_argument("--model", required=True, help="the served model name")
    bl.add_argument("--since", default=None, help="window start (ISO 8601 or epoch seconds; default: the first)")
    bl.add_argument("--until", default=None, help="window end (exclusive; default: now)")
    bl.add_argument("--db", default=argparse.SUPPRESS, help="as for serve")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_spec,
        metavar="NAME=DIR",
        help="serve a checkpoint directory (BERT/GPT-2 text or ViT image) as NAME; NAME=minilm / NAME=digits-vit "
        "for the shipped ones; repeatable (default: minilm and digits-vit)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--queue-size", type=int, default=32, help="requests accepted at once; more get 503")
    parser.add_argument(
        "--retry-after", type=int, default=1, metavar="SECONDS", help="Retry-After of a 503 (full queue), default 1"
    )
    parser.add_argument("--max-text-chars", type=int, default=5000, help="longest text accepted (default 5000)")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MB (default 8)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        metavar="N",
        help="largest decoded image, width x height (default 4096*4096 = 16777216); larger ones get 413",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="text inputs truncated to this (default 128)")
    parser.add_argument("--no-store-inputs", action="store_true", help="keep only the SHA-256 of each input")
    parser.add_argument("--retention-days", type=float, default=None, help="delete records older than this")
    parser.add_argument("--reference-size", type=int, default=50, help="first N requests = reference (default 50)")
    parser.add_argument("--recent-size", type=int, default=50, help="recent window for drift (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _open_store(db: str):
    from attnkit.serve.store import Store, StoreError

    try:
        return Store(db)
    except StoreError as exc:
        raise UserError(str(exc)) from None


def _time(value, flag: str):
    from attnkit.serve.inputs import InputError
    from attnkit.serve.views import parse_time

    try:
        return parse_time(value, flag)
    except InputError as exc:
        raise UserError(str(exc)) from None


def _export(args) -> int:
    from attnkit.cli.checks import check_out_file
    from attnkit.serve.export import export
    from attnkit.serve.store import Filters

    fmt = args.format or args.out.suffix.lower().lstrip(".")
    if fmt not in ("jsonl", "parquet"):
        raise UserError(f"{args.out}: cannot tell the format from the suffix; use .jsonl/.parquet or --format")
    check_out_file(args.out, overwrite=args.overwrite, option="output")  # exists, missing folder, read-only
    filters = Filters(model=args.model, since=_time(args.since, "--since"), until=_time(args.until, "--until"))
    store = _open_store(args.db)
    try:
        count = export(store, args.out, fmt=fmt, filters=filters, overwrite=args.overwrite)
    finally:
        store.close()
    print(f"{count} records -> {args.out}")
    return 0


def _baseline(args) -> int:
    import time

    from attnkit.serve.health import STATISTICS

    since, until = _time(args.since, "--since"), _time(args.until, "--until")
    store = _open_store(args.db)
    try:
        # statistics only (no inputs or maps); records whose statistics were never written are left out
        rows = store.stats_series(args.model, since=since, until=until)
        if not rows:
            raise UserError(f"no records of model {args.model!r} in that window; serve some requests first")
        stats = {name: [float(r["stats"][name]) for r in rows] for name in STATISTICS}
        start = rows[0]["created_at"] if since is None else since
        end = time.time() if until is None else until
        baseline_id = store.add_baseline(args.model, start, end, stats)
    finally:
        store.close()
    print(f"baseline #{baseline_id} for {args.model}: {len(rows)} records; the health page now compares against it")
    return 0


#: Integer flags that must be at least 1.
_POSITIVE_INTS = (
    "queue_size",
    "retry_after",
    "max_text_chars",
    "max_image_pixels",
    "max_tokens",
    "reference_size",
    "recent_size",
)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The :class:`~attnkit.serve.service.ServeConfig` of parsed ``attnkit serve`` flags, checked before any work.

    Raises:
        UserError: a count or limit below 1, a port outside ``[0, 65535]``, a non-positive ``--max-body-mb`` or
            ``--retention-days``, or the serve extra missing.
    """
    for flag in _POSITIVE_INTS:
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.retention_days is not None and args.retention_days <= 0:
        raise UserError(f"--retention-days must be positive, got {args.retention_days}")
    try:
        from attnkit.serve.service import ServeConfig
    except ImportError as exc:
        raise UserError(f"attnkit serve needs the serve extra: pip install 'attnkit[serve]' ({exc})") from None
    return ServeConfig(
        queue_size=args.queue_size,
        retry_after_s=args.retry_after,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_text_chars=args.max_text_chars,
        max_image_pixels=args.max_image_pixels,
        store_inputs=not args.no_store_inputs,
        retention_days=args.retention_days,
        reference_size=args.reference_size,
        recent_size=args.recent_size,
        max_tokens=args.max_tokens,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``serve export``, ``serve baseline`` or the service itself (until SIGINT/SIGTERM); returns 0.

    Raises:
        UserError: a bad flag, an unusable ``--db`` or output path, or a model that cannot be loaded (exit 2,
            before any work).
    """
    if args.serve_command == "export":
        return _export(args)
    if args.serve_command == "baseline":
        return _baseline(args)
    config = serve_config(args)
    models = dict(args.models or [(m, m) for m in DEFAULT_MODELS])
    if len(models) != len(args.models or DEFAULT_MODELS):
        raise UserError("--model: each NAME may be given once")
    try:
        import uvicorn

        from attnkit.serve.app import create_app
        from attnkit.serve.models import ModelLoadError, load_endpoint
        from attnkit.serve.service import Service
    except ImportError as exc:
        raise UserError(f"attnkit serve needs the serve extra: pip install 'attnkit[serve]' ({exc})") from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    store = _open_store(args.db)
    try:
        endpoints = {name: load_endpoint(name, src, max_tokens=args.max_tokens) for name, src in models.items()}
    except ModelLoadError as exc:
        store.close()
        raise UserError(str(exc)) from None
    app = create_app(Service(endpoints, store, config))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"attnkit serve: warning: listening on {args.host}: the API and dashboard have no authentication; put "
            "them behind a reverse proxy that has",
            file=sys.stderr,
        )
    print(f"attnkit serve: {', '.join(endpoints)} on http://{args.host}:{args.port}/ (store {store.backend})")
    sys.stdout.flush()
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=60, log_level="info")
    )
    # uvicorn finishes accepted requests on SIGTERM, then re-raises the signal: make that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


subcommand("serve", "serve attention explanations over HTTP with an audit store and a live dashboard")(
    add_arguments, run
)
