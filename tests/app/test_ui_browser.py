"""The search page in a real browser: headless Chromium from the system's packages (`.ci/run` installs
Debian's `chromium`), driven by Playwright for Python against the service on a local port, over the
bundled example corpus on the tiny test models.

It searches, sees papers grouped with the query's terms highlighted, reads a passage in its paper's
context, follows "papers like this", goes back, finds papers, and sees a refused search as a message.
The page must ask nothing of any other host. A screenshot of the results goes where PAPERINDEX_SCREENSHOT
says (docs/img/search-page.png).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from indexer.runtime import build
from indexer.store import ClientStore

from support.reliability import free_port
from support.tiny_models import tiny_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The picture in docs/ is refreshed on request: PAPERINDEX_SCREENSHOT=docs/img/search-page.png pytest ...
SCREENSHOT = os.environ.get("PAPERINDEX_SCREENSHOT")
# Headless on a host without a display, a GPU or network; a fresh profile each run (Playwright's own).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY = "model training data"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright for Python (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def base_url(tiny_models) -> Iterator[str]:
    """The service on a local port (uvicorn in a thread) with the example corpus indexed through POST /index."""
    import uvicorn

    rt = build(tiny_settings(tiny_models, qdrant_url=":memory:", max_k=20), store=ClientStore(location=":memory:"))
    config = uvicorn.Config(create_app(runtime=rt), host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    body = (files("indexer") / "data" / "example_papers.jsonl").read_bytes()
    ndjson = {"content-type": "application/x-ndjson"}
    r = httpx.post(f"{url}/index", params={"wait": True}, content=body, headers=ndjson, timeout=120)
    assert r.status_code == 200, r.text
    yield url
    server.should_exit = True
    thread.join(30)
    rt.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_search_read_in_context_follow_similar_and_see_errors(base_url, browser):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(15_000)
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))

    page.goto(base_url + "/")
    expect(page.locator("#summary")).to_contain_text("12 papers")
    expect(page.locator("#summary")).to_contain_text("store: server")
    modes = page.locator("select[name=mode] option").all_inner_texts()
    assert modes == ["dense (default)", "hybrid", "dense", "lexical"]

    # a grouped search, submitted with Enter; its options land in the URL
    page.fill("#q", QUERY)
    page.fill("input[name=k]", "5")
    assert page.is_checked("input[name=group_by_paper]")
    page.press("#q", "Enter")
    papers = page.locator("#list > li.paper")
    expect(papers.first).to_be_visible()
    expect(page.locator("#results-title")).to_contain_text(f"5 papers for “{QUERY}”")
    assert papers.count() == 5
    assert re.search(r"q=model\+training\+data", page.url) and "group_by_paper=true" in page.url and "k=5" in page.url
    assert page.evaluate("document.activeElement.id") == "results-title"  # focus moves to the results
    marks = page.locator("#list mark").all_inner_texts()
    assert marks and all(m.lower().startswith(("model", "training", "data")) for m in marks), marks
    first = papers.first
    assert first.locator("h3").inner_text() and first.locator(".passages > li").count() >= 1
    expect(first.locator(".actions .score").first).to_contain_text("score")
    shot = page.screenshot(path=SCREENSHOT, full_page=False)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"

    # a shared URL reproduces the same results
    other = browser.new_page()
    other.goto(page.url)
    expect(other.locator("#list > li.paper")).to_have_count(5)
    assert other.locator("#list > li.paper h3").all_inner_texts() == papers.locator("h3").all_inner_texts()
    assert other.input_value("#q") == QUERY and other.input_value("input[name=k]") == "5"
    other.close()

    # a passage in its paper's context: a dialog with its neighbours, the hit marked
    title = first.locator("h3").inner_text()
    first.locator("button.context").first.click()
    dialog = page.locator("dialog#context")
    expect(dialog).to_be_visible()
    expect(page.locator("#context-title")).to_have_text(title)
    expect(dialog.locator(".passage.hit")).to_have_count(1)
    expect(dialog.locator(".passage.hit .matched")).to_have_count(1)  # the words the query matched best
    assert dialog.locator(".passage").count() >= 2
    assert page.evaluate("document.activeElement.classList.contains('hit')")
    shown = dialog.locator(".passage").evaluate_all("ps => ps.map(p => +p.dataset.chunk)")
    for step in ("#context-after", "#context-before"):  # the next passages over, if the paper has more
        if page.is_enabled(step):
            page.click(step)
            expect(dialog.locator(".passage").first).not_to_have_attribute("data-chunk", str(shown[0]))
            break
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # papers like the first one
    first.locator("button.similar").first.click()
    expect(page.locator("#results-title")).to_contain_text(f"like “{title}”")
    assert "view=similar" in page.url
    similar = page.locator("#list > li.paper h3").all_inner_texts()
    assert similar and title not in similar
    expect(page.locator("#list .score").first).to_contain_text("distance")

    # back to the passages
    page.go_back()
    expect(page.locator("#results-title")).to_contain_text(f"5 papers for “{QUERY}” (dense)")

    # lexical mode: every passage shown holds a query word, marked
    page.select_option("select[name=mode]", "lexical")
    page.press("#q", "Enter")
    expect(page.locator("#results-title")).to_contain_text(f"for “{QUERY}” (lexical)")
    assert "mode=lexical" in page.url
    quotes = page.locator("#list blockquote")
    assert quotes.count() >= 5 and all(q.locator("mark").count() for q in quotes.all())

    # reranked, from 2020 on: the cross-encoder's scores shown, every paper of those years
    page.select_option("select[name=mode]", "")
    page.check("input[name=rerank]")
    page.fill("input[name=year_from]", "2020")
    page.press("#q", "Enter")
    expect(page.locator("#results-title")).to_contain_text("reranked")
    assert "rerank=true" in page.url and "year_from=2020" in page.url and "mode=" not in page.url
    expect(page.locator("#list .score", has_text="rerank").first).to_be_visible()
    years = [int(m.split(" · ")[0]) for m in page.locator("#list > li.paper > .meta").all_inner_texts()]
    assert years and all(y >= 2020 for y in years), years
    page.uncheck("input[name=rerank]")
    page.fill("input[name=year_from]", "")

    # find papers
    page.click("#find-papers")
    expect(page.locator("#results-title")).to_contain_text(f"papers for “{QUERY}”")
    assert "view=papers" in page.url and page.locator("#list > li.paper").count() == 5

    # a refused search (k above the service's maximum, 20) is a readable message, not JSON
    page.fill("input[name=k]", "500")
    page.press("#q", "Enter")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Please check the search. k: must be between 1 and 20 (got 500)")
    assert "{" not in error.inner_text() and page.locator("#results").is_hidden()

    # the other refusals, as the page words them
    assert page.evaluate("explain(429, {detail: 'x', code: 'overloaded'}, '2')") == (
        "The service is busy with other searches; try again in 2 s."
    )
    assert "not available right now" in page.evaluate("explain(503, {detail: 'Qdrant is unreachable'}, '5')")
    assert page.evaluate("explain(409, {detail: 'search it with mode=dense'}, null)") == "search it with mode=dense"

    elsewhere = [u for u in requested if not u.startswith(base_url + "/")]
    assert requested and not elsewhere, elsewhere
    page.close()
