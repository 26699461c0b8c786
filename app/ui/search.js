"use strict";
// The search page. Its state is the page URL's query, whose parameters are GET /search's own (plus
// `view`: passages, papers or similar), so a result can be shared by its URL. It calls only this
// service's API and builds every node with textContent: nothing from the index is parsed as HTML.

const $ = (id) => document.getElementById(id);
const form = $("search");
const SNIPPET_WORDS = 60;
const CONTEXT_RADIUS = 2;
// Words not worth highlighting.
const STOP = new Set(("a an and are as at be by can do does for from has have how in into is it its of on or " +
  "that the their this to was what when where which who why with").split(" "));
const FIELDS = { q: "query", k: "k", year_from: "from year", year_to: "to year", candidates: "candidates", mode: "mode" };

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined && child !== "") node.append(child);
  return node;
}

// --- highlighting ----------------------------------------------------------------------------------

function termPattern(query) {
  const words = (query.toLowerCase().match(/[\p{L}\p{N}]+/gu) || []).filter((w) => w.length > 1 && !STOP.has(w));
  if (!words.length) return null;
  const escaped = [...new Set(words)].map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  return new RegExp(`(?<![\\p{L}\\p{N}])(?:${escaped.join("|")})`, "giu");  // at a word's start: "fold" marks "folding"
}

function highlighted(text, pattern) {
  const out = document.createDocumentFragment();
  let last = 0;
  if (pattern) {
    for (const m of text.matchAll(pattern)) {
      out.append(text.slice(last, m.index), el("mark", {}, m[0]));
      last = m.index + m[0].length;
    }
  }
  out.append(text.slice(last));
  return out;
}

// SNIPPET_WORDS words of a passage: within what the query matched (`match`, the best window's words, when
// the service says), those with the most query terms, starting a little before the first of them.
function snippet(text, pattern, match) {
  const words = text.split(/\s+/).filter(Boolean);
  if (words.length <= SNIPPET_WORDS) return text;
  const lo = match ? Math.min(match.word_start, words.length) : 0;
  const hi = match ? Math.min(Math.max(match.word_end, lo + SNIPPET_WORDS), words.length) : words.length;
  const hits = words.map((w) => (pattern && w.match(pattern) ? 1 : 0));
  let at = Math.max(0, Math.min(lo, words.length - SNIPPET_WORDS));
  let sum = hits.slice(at, at + SNIPPET_WORDS).reduce((a, b) => a + b, 0);
  let best = sum;
  for (let i = at + SNIPPET_WORDS; i < hi; i++) {
    sum += hits[i] - hits[i - SNIPPET_WORDS];
    if (sum > best) [best, at] = [sum, i - SNIPPET_WORDS + 1];
  }
  if (best > 0) at = Math.max(lo, Math.min(hits.indexOf(1, at) - 12, words.length - SNIPPET_WORDS));
  const end = at + SNIPPET_WORDS;
  return (at > 0 ? "… " : "") + words.slice(at, end).join(" ") + (end < words.length ? " …" : "");
}

// A passage's text with the matched words (`match`) set apart, its query terms marked.
function withMatch(text, pattern, match) {
  const spans = [...text.matchAll(/\S+/g)];
  if (!match || match.word_start >= spans.length) return highlighted(text, pattern);
  const start = spans[match.word_start].index;
  const last = spans[Math.min(match.word_end, spans.length) - 1];
  const end = last.index + last[0].length;
  const out = document.createDocumentFragment();
  out.append(highlighted(text.slice(0, start), pattern),
    el("span", { class: "matched", title: "what the query matched best" }, highlighted(text.slice(start, end), pattern)),
    highlighted(text.slice(end), pattern));
  return out;
}

// --- the API ---------------------------------------------------------------------------------------

function explain(status, body, retryAfter) {
  const detail = typeof body.detail === "string" ? body.detail : "";
  if (status === 422) {
    const fields = (body.errors || []).map((e) => `${FIELDS[e.loc[e.loc.length - 1]] || e.loc[e.loc.length - 1]}: ${e.msg}`);
    return `Please check the search. ${fields.length ? fields.join("; ") : detail}`;
  }
  if (status === 429) return `The service is busy with other searches; try again in ${retryAfter || "a few"} s.`;
  if (status === 503) return "The index is not available right now (its store does not answer); try again shortly.";
  if ([400, 404, 409].includes(status) && detail) return detail;
  return `The service could not answer (HTTP ${status}${detail ? `: ${detail}` : ""}).`;
}

async function call(path, params) {
  const query = params && [...params].length ? `?${params}` : "";
  let response;
  try {
    response = await fetch(path + query, { headers: { Accept: "application/json" } });
  } catch (err) {
    throw new Error("The service cannot be reached; is it running?");
  }
  if (response.ok) return response.json();
  const body = await response.json().catch(() => ({}));
  throw new Error(explain(response.status, body, response.headers.get("Retry-After")));
}

// --- page state <-> URL and form -------------------------------------------------------------------

function formParams(view) {
  const data = new FormData(form);
  const params = new URLSearchParams();
  if (view !== "passages") params.set("view", view);
  params.set("q", data.get("q").trim());
  for (const name of ["k", "year_from", "year_to", "mode"]) {
    const value = (data.get(name) || "").trim();
    if (value) params.set(name, value);
  }
  if (view === "passages") {
    for (const name of ["group_by_paper", "rerank"]) if (data.get(name)) params.set(name, "true");
  }
  return params;
}

function fillForm(params) {
  if (params.has("q")) form.q.value = params.get("q");
  for (const name of ["k", "year_from", "year_to"]) form[name].value = params.get(name) || (name === "k" ? "10" : "");
  if (params.get("view") === "similar") return;  // the search options stay as they were for the next search
  form.mode.value = params.get("mode") || "";
  if (params.has("view")) return;
  form.group_by_paper.checked = params.get("group_by_paper") === "true";
  form.rerank.checked = params.get("rerank") === "true";
}

// --- rendering ---------------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function startResults(title) {
  $("error").hidden = true;
  $("results").hidden = false;
  $("results").setAttribute("aria-busy", "true");
  $("results-title").textContent = title;
  $("list").replaceChildren();
}

function finishResults(title) {
  $("results").removeAttribute("aria-busy");
  $("results-title").textContent = title;
  $("results-title").focus();
}

// Three significant digits: fused scores are small (1/61 + 1/62 …), dot products and BM25 are not.
function score(label, value, hint) {
  if (value === null || value === undefined) return "";
  const shown = Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
  return el("span", { class: "score", title: hint }, `${label} ${shown}`);
}

function paperMeta(year, meta) {
  const authors = Array.isArray(meta.authors) ? meta.authors : [];
  const parts = [year, authors.slice(0, 3).join(", ") + (authors.length > 3 ? " et al." : ""), meta.venue].filter(Boolean);
  const line = el("p", { class: "meta" }, parts.join(" · "));
  if (typeof meta.url === "string" && /^https?:\/\//i.test(meta.url)) {
    line.append(parts.length ? " · " : "", el("a", { href: meta.url, rel: "noreferrer noopener", target: "_blank" }, "link"));
  }
  return line;
}

function similarButton(paperId, title) {
  return el("button", { type: "button", class: "similar", onclick: () => showSimilar(paperId, title) }, "Papers like this");
}

// chunk_index -1 is a paper's title and abstract, searched as a passage of its own.
const passageName = (chunkIndex) => (chunkIndex < 0 ? "title and abstract" : `passage ${chunkIndex + 1}`);

function passageItem(p, pattern, withTitle) {
  const where = el("span", { class: "where" }, passageName(p.chunk_index));
  return el("li", { class: "passage" },
    withTitle ? el("h3", {}, p.title || p.paper_id) : "",
    withTitle ? paperMeta(p.metadata.year, p.metadata) : "",
    el("blockquote", {}, highlighted(snippet(p.text, pattern, p.match), pattern)),
    el("div", { class: "actions" }, where,
      score("score", p.score, "match with the query; higher is closer"),
      score("rerank", p.rerank_score, "the cross-encoder's score; higher is better"),
      el("button", { type: "button", class: "context", onclick: () => openContext(p.paper_id, p.chunk_index, pattern, p) },
        "Read in context"),
      withTitle ? similarButton(p.paper_id, p.title) : ""));
}

function renderGroups(groups, pattern) {
  for (const g of groups) {
    const passages = el("ol", { class: "passages" }, ...g.passages.map((p) => passageItem(p, pattern, false)));
    $("list").append(el("li", { class: "paper", tabindex: "0" },
      el("h3", {}, g.title || g.paper_id), paperMeta(g.year, g.metadata),
      el("div", { class: "actions" }, score("score", g.score, "its best passage's score"), similarButton(g.paper_id, g.title)),
      passages));
  }
}

function renderPassages(hits, pattern) {
  for (const p of hits) $("list").append(Object.assign(passageItem(p, pattern, true), { tabIndex: 0 }));
}

// Dense paper scores (and every "papers like this") are SPECTER2 distances; lexical and hybrid ones are
// scores, higher first.
function renderPapers(hits, pattern, mode) {
  const [label, hint] = mode === "dense" ? ["distance", "distance between SPECTER2 embeddings; lower is closer"]
    : ["score", `${mode} score; higher is closer`];
  for (const h of hits) {
    $("list").append(el("li", { class: "paper", tabindex: "0" },
      el("h3", {}, highlighted(h.title || h.paper_id, pattern)), paperMeta(h.year, h.metadata),
      h.abstract ? el("p", { class: "abstract" }, highlighted(snippet(h.abstract, pattern), pattern)) : "",
      el("div", { class: "actions" },
        score(label, h.score, hint), similarButton(h.paper_id, h.title))));
  }
}

const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;

let latest = 0;  // the search the page shows: an earlier one that answers late is dropped

async function run(params, push) {
  const mine = ++latest;
  if (push) history.pushState(null, "", `/?${params}`);
  fillForm(params);
  const view = params.get("view") || "passages";
  const api = new URLSearchParams(params);
  api.delete("view");
  const q = params.get("q") || "";
  const pattern = view === "similar" ? null : termPattern(q);
  startResults("Searching…");
  try {
    if (view === "similar") {
      const id = api.get("paper_id") || "";
      api.delete("paper_id");
      api.delete("q");
      const path = `/papers/${encodeURIComponent(id)}`;
      const [paper, res] = await Promise.all([call(path), call(`${path}/similar`, api)]);
      if (mine !== latest) return;
      renderPapers(res.hits, null, "dense");
      finishResults(`${count(res.hits.length, "paper")} like “${paper.title || id}”`);
    } else if (view === "papers") {
      const res = await call("/search/papers", api);
      if (mine !== latest) return;
      renderPapers(res.hits, pattern, res.mode);
      finishResults(`${count(res.hits.length, "paper")} for “${q}” (${res.mode})`);
    } else {
      const res = await call("/search", api);
      if (mine !== latest) return;
      if (res.groups) renderGroups(res.groups, pattern);
      else renderPassages(res.hits, pattern);
      const n = res.groups ? count(res.groups.length, "paper") : count(res.hits.length, "passage");
      finishResults(`${n} for “${q}” (${res.mode}${res.reranked ? ", reranked" : ""})`);
    }
  } catch (err) {
    if (mine !== latest) return;
    $("results").hidden = true;
    showError(err.message);
  }
}

function showSimilar(paperId, title) {
  const params = new URLSearchParams({ view: "similar", paper_id: paperId });
  for (const name of ["k", "year_from", "year_to"]) if (form[name].value) params.set(name, form[name].value);
  if (title) $("results-title").textContent = `Papers like “${title}”…`;
  run(params, true);
}

// --- a passage in its paper --------------------------------------------------------------------------

// `hit`: the passage found (its chunk_index and match), marked wherever the window of passages moves.
async function openContext(paperId, chunkIndex, pattern, hit) {
  const dialog = $("context");
  let res;
  try {
    res = await call("/passages/context", new URLSearchParams({ paper_id: paperId, chunk_index: chunkIndex, radius: CONTEXT_RADIUS }));
  } catch (err) {
    showError(err.message);
    return;
  }
  const first = res.passages[0].chunk_index, last = res.passages[res.passages.length - 1].chunk_index;
  $("context-title").textContent = res.title || res.paper_id;
  $("context-meta").replaceChildren(paperMeta(res.year, res.metadata),
    el("span", {}, `${passageName(first)} to ${passageName(last)}`));
  $("context-body").replaceChildren(...res.passages.map((p) => {
    const isHit = p.chunk_index === hit.chunk_index;
    return el("section", { class: isHit ? "passage hit" : "passage", tabindex: "-1", "data-chunk": p.chunk_index },
      el("h3", {}, `${passageName(p.chunk_index)}${isHit ? " (the hit)" : ""}`),
      el("p", {}, isHit ? withMatch(p.text, pattern, hit.match) : highlighted(p.text, pattern)));
  }));
  // Around the passage just beyond either edge: it exists when the service says the paper goes on.
  $("context-before").disabled = !res.more_before;
  $("context-before").onclick = () => openContext(paperId, first - 1, pattern, hit);
  $("context-after").disabled = !res.more_after;
  $("context-after").onclick = () => openContext(paperId, last + 1, pattern, hit);
  if (!dialog.open) dialog.showModal();
  const focus = dialog.querySelector(".hit") || dialog.querySelector(`[data-chunk="${res.chunk_index}"]`);
  focus.scrollIntoView({ block: "center" });
  focus.focus();
}

// --- the index summary --------------------------------------------------------------------------------

const shortName = (name) => name.split("/").filter(Boolean).slice(-2).join("/");

async function loadSummary() {
  try {
    const s = await call("/stats");
    const parts = [count(s.papers, "paper"), count(s.passages, "passage"), `passages: ${shortName(s.models.passage)}`,
      `papers: ${shortName(s.models.paper)}`, `reranker: ${s.models.reranker ? shortName(s.models.reranker) : "none"}`,
      `store: ${s.store.kind}`];
    $("summary").textContent = parts.join(" · ");
    showModes(s.search_modes, s.search_mode);
    $("summary").title = JSON.stringify(s.models, null, 1);
    if (!s.models.reranker) {
      form.rerank.disabled = true;
      form.rerank.parentElement.title = "no reranker is configured";
    }
    if (!s.models.query_adapter) {
      $("find-papers").disabled = true;
      $("find-papers").title = "no query adapter is configured";
    }
  } catch (err) {
    $("summary").textContent = `Index summary unavailable: ${err.message}`;
  }
}

// The modes this index can search in; without its default (an index built before BM25), dense is chosen.
function showModes(modes, fallback) {
  const options = modes.map((m) => el("option", { value: m }, m));
  if (modes.includes(fallback)) options.unshift(el("option", { value: "" }, `${fallback} (default)`));
  form.mode.replaceChildren(...options);
  const asked = new URLSearchParams(location.search).get("mode");
  form.mode.value = modes.includes(asked) ? asked : options[0].value;
  $("mode-field").hidden = false;
}

// --- wiring ---------------------------------------------------------------------------------------------

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const view = event.submitter && event.submitter.value === "papers" ? "papers" : "passages";
  run(formParams(view), true);
});
$("context-close").addEventListener("click", () => $("context").close());
window.addEventListener("popstate", () => {
  const params = new URLSearchParams(location.search);
  if (params.has("q") || params.has("paper_id")) run(params, false);
});
loadSummary();
{
  const params = new URLSearchParams(location.search);
  if (params.has("q") || params.has("paper_id")) run(params, false);
}
