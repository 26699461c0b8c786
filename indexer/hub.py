"""Where the models come from, checked before any is loaded: a local directory, the Hugging Face cache,
or the hub.

    refs = model_refs(settings, paper=True, passage=True)
    check_models(refs)    # raises ModelsMissing naming every model that cannot be had, with its setting

A model that is neither a local directory nor in the cache needs the hub. Where the hub cannot be
reached (a firewalled host; or HF_HUB_OFFLINE is set) the check fails at once, listing every such
model, rather than letting each load retry the network in turn. Where every model is here, an
unreachable hub puts the process in offline mode, so loading does not ask the network either.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .config import Settings
from .errors import ModelsMissing

# Seconds to wait for a connection to the hub before calling it unreachable.
HUB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelRef:
    role: str  # "passage model", ...
    setting: str  # the variable that sets it
    name: str  # a hub id or a directory


def model_refs(s: Settings, paper: bool = False, passage: bool = False, reranker: bool = False) -> list[ModelRef]:
    """The models a command needs: the paper model with its adapters, the passage model, the reranker."""
    refs = []
    if paper:
        refs += [
            ModelRef("paper model", "PAPERINDEX_PAPER_MODEL", s.paper_model),
            ModelRef("paper adapter", "PAPERINDEX_PAPER_ADAPTER", s.paper_adapter),
        ]
        if s.query_adapter:
            refs.append(ModelRef("query adapter", "PAPERINDEX_QUERY_ADAPTER", s.query_adapter))
    if passage:
        refs.append(ModelRef("passage model", "PAPERINDEX_PASSAGE_MODEL", s.passage_model))
    if reranker and s.reranker_model:
        refs.append(ModelRef("reranker model", "PAPERINDEX_RERANKER_MODEL", s.reranker_model))
    return refs


def _local(name: str) -> bool:
    """Whether `name` means a directory (as transformers reads it: an existing path, or one spelt as a path)."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "adapter_config.json"))


def _offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a connection to the hub (HF_ENDPOINT, default huggingface.co) opens within `timeout`."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Load from the cache only from now on (HF_HUB_OFFLINE). huggingface_hub reads the variable when it
    is imported; where it already is, its flag is set too (what transformers asks before each download)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def check_models(refs: list[ModelRef], timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise ModelsMissing naming every model of `refs` that cannot be had: a directory that is not there,
    or a hub id not in the cache while the hub is unreachable. The hub is asked (one connection, at most
    `timeout` seconds) only when some model is not here."""
    missing = [
        f"cannot load {r.role} {r.name!r} ({r.setting}): no such directory"
        for r in refs
        if _local(r.name) and not Path(r.name).expanduser().is_dir()
    ]
    remote = [r for r in refs if not _local(r.name) and not _cached(r.name)]
    if remote:
        offline, why = _offline_set(), "HF_HUB_OFFLINE is set"
        if not offline and not hub_reachable(timeout):
            offline, why = True, f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable"
            go_offline()
        if offline:
            missing += [
                f"cannot load {r.role} {r.name!r} ({r.setting}): not in the Hugging Face cache and {why}"
                for r in remote
            ]
    elif not _offline_set() and any(not _local(r.name) for r in refs) and not hub_reachable(timeout):
        go_offline()  # every model is cached: loading need not wait on the network
    if missing:
        raise ModelsMissing(
            "\n  ".join([f"{len(missing)} model(s) cannot be loaded:", *missing])
            + "\n  Set each variable to a local directory (or a hub id in the cache), or let this host reach the hub."
        )
