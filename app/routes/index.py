"""POST /index (one paper or a list, queued) and GET /index/{job_id}."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from indexer.papers import PaperIn, validate

from ..deps import ServiceDep, WriteAccess
from ..errors import COMMON, InvalidRequest, QueueFull, classify
from ..schemas import ErrorResponse, IndexJob, PaperError

router = APIRouter(responses=COMMON, tags=["index"])

_PAPER_SCHEMA = PaperIn.model_json_schema()
_EXAMPLE_PAPER = {
    "paper_id": "arXiv:1706.03762",
    "title": "Attention Is All You Need",
    "abstract": "The dominant sequence transduction models are based on complex recurrent or convolutional ...",
    "text": "1 Introduction\nRecurrent neural networks, long short-term memory and gated recurrent neural networks ...",
    "year": 2017,
    "authors": ["A. Vaswani", "N. Shazeer"],
    "venue": "NeurIPS",
}
_OTHER_PAPER = {"paper_id": "doi:10.1000/xyz", "title": "Another paper", "year": 2020}
_BODY = {
    "required": True,
    "description": "One paper, a list of papers, or one paper per line (application/x-ndjson, as `paperindex index` "
                   "reads). Keys beyond the named fields are kept as metadata.",
    "content": {
        "application/json": {
            "schema": {"oneOf": [_PAPER_SCHEMA, {"type": "array", "items": _PAPER_SCHEMA, "minItems": 1}]},
            "examples": {
                "one": {"summary": "one paper", "value": _EXAMPLE_PAPER},
                "many": {"summary": "a list", "value": [_EXAMPLE_PAPER, _OTHER_PAPER]},
            },
        },
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one paper per line (JSON Lines), as `paperindex index` reads"},
            "example": json.dumps(_EXAMPLE_PAPER) + "\n" + json.dumps(_OTHER_PAPER) + "\n",
        },
    },
}
# JSON Lines under the names clients send it with; any other type is read as one JSON document.
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
                          "application/json-lines"})


def json_documents(raw: bytes) -> list[Any]:
    """The JSON documents of a JSON Lines body, one after another. Newlines are not needed between
    them: `curl -d @papers.jsonl` strips them (only `--data-binary` keeps a file as it is)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidRequest([(("body",), f"not valid UTF-8: {exc}")]) from None
    decoder = json.JSONDecoder()
    docs: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return docs
        try:
            doc, at = decoder.raw_decode(text, at)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest([(("body", len(docs)), f"paper {len(docs) + 1}: not valid JSON: {exc}")]) from None
        docs.append(doc)


def parse_papers(raw: bytes, lines: bool = False) -> tuple[list[PaperIn], list[PaperError], int]:
    """Papers from a request body (one JSON document, or JSON Lines with `lines`), each validated on its
    own: (valid, rejected, received)."""
    if lines:
        items = json_documents(raw)
    else:
        try:
            doc: Any = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            several = "Extra data" in str(exc)
            hint = "; for one paper per line send Content-Type: application/x-ndjson" if several else ""
            raise InvalidRequest([(("body",), f"not valid JSON: {exc}{hint}")]) from None
        items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidRequest([(("body",), "the list of papers is empty")])
    papers: list[PaperIn] = []
    rejected: list[PaperError] = []
    seen: set[str] = set()
    for i, obj in enumerate(items):
        rec = validate(obj, "request", i + 1)
        if not isinstance(rec, PaperIn):
            rejected.append(PaperError(index=i, paper_id=rec.paper_id, error=rec.error))
        elif rec.paper_id in seen:
            rejected.append(PaperError(index=i, paper_id=rec.paper_id, error="duplicate paper_id in this request"))
        else:
            seen.add(rec.paper_id)
            papers.append(rec)
    return papers, rejected, len(items)


@router.post(
    "/index",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=IndexJob,
    summary="Index one paper or a list (queued; re-posting a paper replaces it)",
    description=(
        "Each paper is validated on its own: invalid ones are reported in `errors` and the rest are queued (with "
        "`strict=true` one invalid paper refuses the whole request). The answer is 202 with a job to follow at "
        "GET /index/{job_id}; with `wait=true` it comes when the papers are searchable (200), or after `timeout` "
        "seconds (202). A paper posted again replaces its previous version exactly; an unchanged paper is skipped."
    ),
    openapi_extra={"requestBody": _BODY},
    dependencies=[WriteAccess],
    responses={
        200: {"model": IndexJob, "description": "wait=true: the job finished and its papers are searchable"},
        401: {"model": ErrorResponse, "description": "missing or wrong API key"},
        413: {"model": ErrorResponse, "description": "body larger than PAPERINDEX_MAX_BODY_BYTES"},
        422: {"model": ErrorResponse, "description": "not JSON, no valid paper, or (strict=true) any invalid paper"},
        429: {"model": ErrorResponse, "description": "the index queue is full; see Retry-After"},
        503: {"model": IndexJob, "description": "wait=true: the job failed because Qdrant is unreachable"},
    },
)
async def index(
    request: Request,
    svc: ServiceDep,
    wait: Annotated[bool, Query(description="answer only when the papers are searchable (or the job failed)")] = False,
    timeout: Annotated[float, Query(gt=0, le=600, description="with wait=true: seconds to wait at most")] = 60.0,
    strict: Annotated[bool, Query(description="refuse the whole request if any paper is invalid")] = False,
    force: Annotated[bool, Query(description="re-embed papers even when unchanged")] = False,
) -> JSONResponse:
    if svc.jobs.depth() >= svc.settings.index_queue_size:
        # Refused before reading the body: under a burst of large posts, reading and parsing megabytes
        # only to answer 429 made the refusals slow and memory grow with the number of posters.
        svc.metrics.jobs.labels("rejected").inc()
        waiting = svc.settings.index_queue_size
        raise QueueFull(f"the index queue is full ({waiting} jobs waiting); retry later", svc.jobs.retry_after())
    lines = request.headers.get("content-type", "").partition(";")[0].strip().lower() in NDJSON_TYPES
    # megabytes of JSON: parsed off the event loop
    papers, rejected, received = await run_in_threadpool(parse_papers, await request.body(), lines)
    if rejected and (strict or not papers):
        why = "strict=true and some papers are invalid" if papers else "no valid paper in the request"
        each = [(("body", e.index), f"{e.paper_id or 'paper'}: {e.error}") for e in rejected]
        raise InvalidRequest([*each, (("body",), why)])
    job = svc.jobs.submit(papers, rejected, received, force)
    headers = {"Location": f"/index/{job.id}"}
    if wait and await job.wait(timeout):
        code = classify(job.exc).status if job.exc is not None else status.HTTP_200_OK
        return JSONResponse(job.view().model_dump(mode="json"), status_code=code, headers=headers)
    return JSONResponse(job.view().model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED, headers=headers)


@router.get(
    "/index/{job_id}",
    response_model=IndexJob,
    summary="Status, counts and per-paper errors of a job",
    responses={404: {"model": ErrorResponse, "description": "unknown job id"}},
)
async def job_status(svc: ServiceDep, job_id: str) -> IndexJob:
    return svc.jobs.get(job_id).view()
