"""`paperindex`: the library's commands (`indexer.cli`) and `serve`, which runs this HTTP service.

The entry point lives here, above both, so that `indexer` never imports `app`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from indexer import cli
from indexer.commands.common import settings_of
from indexer.hub import check_models, model_refs


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    s = settings_of(args)
    check_models(model_refs(s, paper=True, passage=True, reranker=True))
    # uvicorn closes idle connections after 5 s by default, as long as httpx keeps them for reuse: a
    # request sent just as the server closes is reset. The server must hold them longer than clients.
    uvicorn.run(
        create_app(s),
        host=args.host or s.host,
        port=args.port or s.port,
        log_level="info",
        timeout_keep_alive=s.keep_alive_s,
    )
    return 0


def add_serve(
    command: Callable[[str, list[argparse.ArgumentParser], str], argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    sv = command("serve", [common], "run the HTTP service (uvicorn)")
    sv.add_argument(
        "--host", help="address to bind (PAPERINDEX_HOST; default 127.0.0.1, this host only: 0.0.0.0 for all)"
    )
    sv.add_argument("--port", type=int, help="port (PAPERINDEX_PORT; default 8000)")
    sv.set_defaults(func=cmd_serve)


def parser() -> argparse.ArgumentParser:
    return cli.parser(add_serve)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, add_serve)


if __name__ == "__main__":
    sys.exit(main())
