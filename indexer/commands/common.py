"""What the commands share: their settings, filters and JSON output."""

from __future__ import annotations

import argparse
import json
import logging

from pydantic import ValidationError

from ..errors import CliError

log = logging.getLogger("paperindex")


def settings_of(args: argparse.Namespace):
    from ..config import Settings

    overrides = {
        k: v
        for k, v in {
            "qdrant_path": args.qdrant_path,
            "qdrant_url": args.qdrant_url,
            "device": args.device,
        }.items()
        if v is not None
    }
    for name in ("long_chunk", "max_chunks_per_paper", "bulk_load"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise CliError(f"bad settings: {exc}") from exc


def search_filter(args: argparse.Namespace):
    from ..store import SearchFilter

    return SearchFilter(args.year_from, args.year_to, list(args.filter_paper_ids or []))


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
