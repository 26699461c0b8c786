"""The `paperindex` command as a user runs it: exit codes and messages."""

import json
import os
import re

import pytest

from indexer.cli import main

from support import ROOT
from support.papers import make_paper, write_jsonl


@pytest.fixture
def env(settings, monkeypatch):
    for k, v in settings.model_dump().items():
        if v is not None and not isinstance(v, list):
            monkeypatch.setenv(f"PAPERINDEX_{k.upper()}", str(v))
    return settings


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_index_search_similar_stats_delete(env, papers_file, capsys):
    code, out, err = run(capsys, "index", str(papers_file), "-q", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["papers_indexed"] == 12 and summary["bad_records"] == 0 and summary["tokens"] > 0
    code, out, _ = run(capsys, "search", "protein folding", "-k", "3", "--json")
    hits = json.loads(out)["hits"]
    assert code == 0 and len(hits) == 3 and {"paper_id", "title", "chunk_index", "text", "score"} <= set(hits[0])
    code, out, _ = run(capsys, "search", "protein", "--group", "-k", "4", "--json")
    groups = json.loads(out)["groups"]
    assert len({g["paper_id"] for g in groups}) == len(groups) == 4
    code, out, _ = run(capsys, "search", "protein", "--papers", "-k", "2", "--year-from", "2000", "--json")
    assert code == 0 and all(r["year"] >= 2000 for r in json.loads(out)["hits"])
    code, out, _ = run(capsys, "similar", "p0003", "-k", "5", "--json")
    similar = json.loads(out)["hits"]
    assert code == 0 and "p0003" not in {r["paper_id"] for r in similar} and len(similar) == 5
    code, out, _ = run(capsys, "stats", "--json")
    assert json.loads(out)["papers"] == 12
    code, out, err = run(capsys, "delete", "p0001", "ghost")
    assert code == 1 and "deleted 1 paper" in out and "ghost" in err
    code, out, _ = run(capsys, "stats", "--json")
    assert json.loads(out)["papers"] == 11


def test_bad_records_skipped_or_refused_with_strict(env, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [make_paper(1), {"paper_id": "x"}, "{broken", make_paper(2)])
    code, out, err = run(capsys, "index", str(path), "-q", "--strict")
    assert code == 1 and "in.jsonl:2 (x)" in err and "in.jsonl:3" in err and "nothing indexed" in err
    code, out, err = run(capsys, "stats", "--json")
    assert json.loads(out)["papers"] == 0
    code, out, err = run(capsys, "index", str(path), "-q")
    assert code == 0 and "indexed 2 papers" in out and "2 bad record(s)" in out and "in.jsonl:2 (x)" in err


def test_chunk_cap_is_visible(env, tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [make_paper(1, words=2000)])
    code, out, _ = run(capsys, "index", str(path), "-q", "--max-chunks-per-paper", "2")
    assert code == 0 and "1 paper(s) cut to 2 chunks" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "/no/such/file.jsonl"], "no such file or folder"),
        (["index", "x.jsonl", "--shard", "3/2"], "--shard"),
        (["similar", "ghost"], "index some papers first"),  # the index is empty: said before anything else
        (["search", "q"], "index some papers first"),
    ],
)
def test_errors_exit_non_zero_with_a_message(env, capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 1 and message in err and "Traceback" not in err


def test_bad_model_path(env, monkeypatch, papers_file, capsys):
    monkeypatch.setenv("PAPERINDEX_PASSAGE_MODEL", "/no/such/model")
    code, _, err = run(capsys, "index", str(papers_file), "-q")
    assert code == 1 and "cannot load passage model '/no/such/model'" in err


def test_unreachable_qdrant(env, monkeypatch, papers_file, capsys):
    monkeypatch.setenv("PAPERINDEX_QDRANT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PAPERINDEX_QDRANT_TIMEOUT", "1")
    monkeypatch.setattr("indexer.pipeline.retry.__kwdefaults__", {"attempts": 2, "base_delay": 0.01})
    code, _, err = run(capsys, "stats")
    assert code == 1 and "Qdrant is unreachable" in err


def test_migrate_to_server_is_resumable(env, papers_file, tmp_path, capsys, monkeypatch):
    from indexer.migrate import migrate
    from indexer.store import ClientStore, EdgeStore

    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    source = EdgeStore(env.qdrant_path)
    target = ClientStore(location=":memory:")
    ckpt = tmp_path / "ckpt.json"
    calls = {"n": 0}
    real = target.upsert

    def flaky(collection, points):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("connection reset")
        real(collection, points)

    monkeypatch.setattr(target, "upsert", flaky)
    with pytest.raises(ConnectionError):
        migrate(source, target, ckpt, batch=5)
    assert json.loads(ckpt.read_text())[source.chunks]["copied"] == 5
    copied = migrate(source, target, ckpt, batch=5)
    n_chunks = source.count(source.chunks)
    assert copied == {source.chunks: n_chunks, source.papers: 12}
    assert target.count(target.chunks) == n_chunks and target.count(target.papers) == 12
    assert target.layout() == source.layout()
    hit = target.search(
        target.chunks,
        source.get_papers(["p0002"], with_vectors=True)["p0002"].vector[:1].repeat(target.layout().chunk_dim),
        1,
    )
    assert hit and hit[0].payload["text"]
    source.close()


def test_index_writes_the_chunk_shards_from_processes_of_their_own(env, papers_file, monkeypatch, capsys):
    from indexer.store import edge as store_module

    made = []
    real = store_module.ShardWriters

    def counting(dirs, vname, create=None, *tuning):
        made.append((len(dirs), create is not None))
        return real(dirs, vname, create, *tuning)

    monkeypatch.setattr(store_module, "ShardWriters", counting)
    code, out, err = run(capsys, "index", str(papers_file), "-q", "--json")
    assert code == 0, err
    assert made == [(2, True)]  # PAPERINDEX_EDGE_CHUNK_SHARDS' default, created by the writers
    code, out, _ = run(capsys, "stats", "--json")
    assert (
        code == 0
        and json.loads(out)["chunks"]
        == json.loads(run(capsys, "index", str(papers_file), "-q", "--json", "--force")[1])["chunks"]
    )
    assert made == [(2, True), (2, False)]  # the second run's writers open them


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path):
    """`paperindex search ... | head`: the reader closes the pipe; no traceback, the pipe's exit code."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, indexer.cli as cli\n"
        "def flood(args):\n"
        "    for i in range(200000):\n"
        "        print('hit', i)\n"
        "    return 0\n"
        "cli.cmd_stats = flood\n"
        "sys.exit(cli.main(['stats']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline() == b"hit 0\n"
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_index_leaves_the_loaded_models_out_of_full_garbage_collections(env, papers_file, monkeypatch, capsys):
    """While `paperindex index` runs, what existed once its models were loaded is frozen (gc.freeze):
    a full collection over it would hold every GPU's threads for ~0.4 s. The block ends unfrozen."""
    import gc

    from indexer.pipeline import Indexer

    frozen = []
    real = Indexer.index

    def index(self, *a, **kw):
        frozen.append(gc.get_freeze_count())
        return real(self, *a, **kw)

    monkeypatch.setattr(Indexer, "index", index)
    assert gc.get_freeze_count() == 0
    code, _, err = run(capsys, "index", str(papers_file), "-q")
    assert code == 0, err
    assert len(frozen) == 1 and frozen[0] > 10_000  # the models, at least
    assert gc.get_freeze_count() == 0


# Ctrl-C -----------------------------------------------------------------------------------------

# `paperindex index` in a subprocess whose passage encoder is fast for its first `FAST` groups, then
# takes a minute over each (a slow device): Ctrl-C must not wait for a group in encoding.
SLOW_INDEX = (
    "import sys, time\n"
    "from indexer.encode import PassageEncoder\n"
    "from indexer.cli import main\n"
    "inner, calls = PassageEncoder.encode_windows, []\n"
    "def encode_windows(self, *a, **kw):\n"
    "    calls.append(1)\n"
    "    if len(calls) > int(sys.argv[1]):\n"
    "        time.sleep(60)\n"
    "    return inner(self, *a, **kw)\n"
    "PassageEncoder.encode_windows = encode_windows\n"
    "sys.exit(main(['index', *sys.argv[2:]]))\n"
)


def interrupted_run(env: dict, path, fast: int, device: str) -> tuple[int, str, float]:
    """Run SLOW_INDEX until its bar shows `fast` papers, Ctrl-C it (SIGINT to its process group, as a
    terminal does); (exit code, stderr, seconds from the signal to the exit)."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from support.reliability import EVERY_BATCH

    env = env | EVERY_BATCH | {"PAPERINDEX_DEVICE": device}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_INDEX, str(fast), str(path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    err, t_end = b"", time.monotonic() + 300
    while time.monotonic() < t_end:
        err += proc.stderr.read1(4096)
        done = [int(n) for n in re.findall(rb"indexing:.*?(\d+)/\d+", err[-300:])]
        if done and done[-1] >= fast:
            break
    os.killpg(proc.pid, signal.SIGINT)
    t = time.monotonic()
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, (err + rest).decode(errors="replace"), time.monotonic() - t


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ctrl_c_answers_at_once_keeps_what_is_encoded_and_the_rerun_says_so(settings, tmp_path, device):
    """Ctrl-C while a group is in a (slow) encode: the run ends within seconds with 130 and one line
    saying how many papers it kept; no traceback from any process, no abort; the index holds exactly
    those papers, and the rerun reports them as already indexed."""
    import subprocess
    import sys

    from indexer.store import EdgeStore

    from support.reliability import settings_env

    path = write_jsonl(tmp_path / "in.jsonl", [make_paper(i, words=200) for i in range(12)])
    # groups sized as a CPU's default: by measured speed, one paper each until measured
    env = settings_env(settings.model_copy(update={"papers_per_batch": None}))
    code, err, seconds = interrupted_run(env, path, fast=3, device=device)
    lines = [line for line in err.splitlines() if "paperindex index:" in line]
    assert code == 130 and seconds < 15, (code, seconds, err[-2000:])
    assert "Traceback" not in err and "terminate called" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert len(lines) == 1 and "interrupted after" in lines[0] and "rerun to resume" in lines[0], lines
    kept = int(re.search(r"(\d+) paper\(s\) indexed and kept", lines[0]).group(1))
    store = EdgeStore(settings.qdrant_path)
    try:
        assert 3 <= kept == store.count(store.papers) < 12
    finally:
        store.close()
    done = subprocess.run(
        [sys.executable, "-m", "indexer.cli", "index", str(path)],
        env=env | {"PAPERINDEX_DEVICE": device},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and f"{kept} already indexed" in done.stdout, done.stdout + done.stderr[-2000:]


# the command line's edges ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["search", "q", "-k", "-3"], "-k"),
        (["search", "q", "-k", "0"], "-k"),
        (["search", "q", "--group", "--group-size", "0"], "--group-size"),
        (["search", "q", "--group", "-k", "-1"], "-k"),
        (["search", "q", "--papers", "-k", "0"], "-k"),
        (["search", "q", "--rerank", "--candidates", "0"], "--candidates"),
        (["similar", "p0001", "-k", "0"], "-k"),
        (["index", "--max-chunks-per-paper", "0"], "--max-chunks-per-paper"),
        (["search", "q", "-k", "ten"], "-k"),
    ],
)
def test_counts_below_one_are_argument_errors(env, capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, err


def test_version_and_every_option_with_help_and_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("paperindex ")
    from app.cli import parser

    commands = next(a for a in parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.default not in (None, False) and action.default != "==SUPPRESS==" and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.option_strings}"
    assert "(default: 10)" in commands["search"].format_help() and "(default: 3)" in commands["search"].format_help()


def test_no_results_say_so(env, papers_file, capsys):
    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    code, out, _ = run(capsys, "search", "protein", "--year-from", "2030")
    assert code == 0 and out.strip() == "no results"
    code, out, _ = run(capsys, "search", "protein", "--year-from", "2030", "--json")
    assert code == 0 and json.loads(out)["hits"] == []


def test_json_is_the_http_apis_shape(env, papers_file, capsys):
    """`--json` prints what the service answers for the same search (app.schemas validates it, every field)."""
    from app.schemas import GroupedSearchResponse, PaperSearchResponse, PassageSearchResponse, SimilarResponse

    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    for argv, model in [
        (["search", "protein", "-k", "3"], PassageSearchResponse),
        (["search", "protein", "--group", "-k", "2"], GroupedSearchResponse),
        (["search", "protein", "--papers", "-k", "2"], PaperSearchResponse),
        (["similar", "p0001", "-k", "2"], SimilarResponse),
    ]:
        code, out, err = run(capsys, *argv, "--json")
        assert code == 0, err
        got = json.loads(out)
        assert json.loads(model.model_validate(got).model_dump_json()) == got, argv


def test_scores_are_labelled_and_paper_scores_are_distances(env, papers_file, capsys):
    """Passage scores (higher is better) and paper scores (SPECTER2's Euclidean distance, lower is
    closer: what Qdrant returns for the papers' metric) each say what they are."""
    import numpy as np

    from indexer.store import EdgeStore

    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    code, out, _ = run(capsys, "search", "protein", "--mode", "dense", "-k", "2")
    assert code == 0 and out.startswith("passages; score: dot product") and "higher is better" in out.splitlines()[0]
    code, out, _ = run(capsys, "similar", "p0001", "-k", "3")
    assert code == 0 and "Euclidean distance between SPECTER2 vectors, lower is closer" in out.splitlines()[0]
    code, out, _ = run(capsys, "similar", "p0001", "-k", "3", "--json")
    hits = json.loads(out)["hits"]
    store = EdgeStore(env.qdrant_path)
    try:
        vecs = {
            k: v.vector
            for k, v in store.get_papers(["p0001", *(h["paper_id"] for h in hits)], with_vectors=True).items()
        }
    finally:
        store.close()
    distances = [float(np.linalg.norm(vecs["p0001"] - vecs[h["paper_id"]])) for h in hits]
    assert [h["score"] for h in hits] == pytest.approx(distances, rel=1e-3) and distances == sorted(distances)


def test_stats_reads_as_text(env, papers_file, capsys):
    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    code, out, _ = run(capsys, "stats")
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert code == 0 and lines["papers"] == "12" and "embedded Qdrant Edge" in lines["index"]
    assert "{" not in out and lines["disk"].endswith(("KB", "MB")) and "dot product" in lines["vectors"]


def test_search_loads_only_the_models_it_needs_and_checks_the_index_first(env, papers_file, capsys, monkeypatch):
    """An empty index answers before any model is loaded; `similar` loads none; passage search loads no
    paper model; paper search no passage model."""
    from indexer.encode import PaperEncoder, PassageEncoder

    loaded = []
    for cls in (PaperEncoder, PassageEncoder):
        inner = cls.__init__

        def init(self, *a, cls=cls, inner=inner, **kw):
            loaded.append(cls.__name__)
            inner(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", init)
    code, _, err = run(capsys, "search", "protein")
    assert code == 1 and "index some papers first" in err and loaded == []
    assert run(capsys, "index", str(papers_file), "-q")[0] == 0
    loaded.clear()
    assert run(capsys, "similar", "p0001")[0] == 0 and loaded == []
    code, _, err = run(capsys, "similar", "ghost")
    assert code == 1 and "not in the index" in err
    assert run(capsys, "search", "protein")[0] == 0 and loaded == ["PassageEncoder"]
    loaded.clear()
    assert run(capsys, "search", "protein", "--papers")[0] == 0 and loaded == ["PaperEncoder"]


# models missing ---------------------------------------------------------------------------------


def test_every_missing_model_is_named_with_its_setting_at_once(env, monkeypatch, papers_file, capsys):
    """Offline, with one model a directory that is not there and two hub ids not in the cache: one error
    lists all three with the variables that set them, before any model is loaded, in a moment."""
    import time

    from indexer.encode import PaperEncoder, PassageEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PAPERINDEX_PASSAGE_MODEL", "/no/such/model")
    monkeypatch.setenv("PAPERINDEX_PAPER_MODEL", "nobody/not-cached-base")
    monkeypatch.setenv("PAPERINDEX_PAPER_ADAPTER", "nobody/not-cached-adapter")
    loads = []
    monkeypatch.setattr(PaperEncoder, "__init__", lambda *a, **kw: loads.append(1))
    monkeypatch.setattr(PassageEncoder, "__init__", lambda *a, **kw: loads.append(1))
    t = time.perf_counter()
    code, _, err = run(capsys, "index", str(papers_file), "-q")
    assert code == 1 and time.perf_counter() - t < 5 and loads == []
    assert "3 model(s) cannot be loaded" in err and "Traceback" not in err
    for setting, name in [
        ("PASSAGE_MODEL", "/no/such/model"),
        ("PAPER_MODEL", "nobody/not-cached-base"),
        ("PAPER_ADAPTER", "nobody/not-cached-adapter"),
    ]:
        assert f"{name!r} (PAPERINDEX_{setting})" in err
    assert "HF_HUB_OFFLINE is set" in err


def test_an_unreachable_hub_fails_fast_and_turns_loading_offline(monkeypatch, tiny_models):
    """Not offline by setting, the hub unreachable (nothing listens there): a model not cached is
    reported within the probe's timeout, the process then offline; models in local directories need no hub."""
    import time

    from indexer import hub
    from indexer.config import Settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    s = Settings(**tiny_models)
    t = time.perf_counter()
    with pytest.raises(hub.ModelsMissing, match=r"nobody/x' \(PAPERINDEX_PASSAGE_MODEL\).*unreachable"):
        hub.check_models(hub.model_refs(s.model_copy(update={"passage_model": "nobody/x"}), passage=True))
    assert time.perf_counter() - t < hub.HUB_TIMEOUT_S + 1 and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.check_models(hub.model_refs(s, paper=True, passage=True, reranker=True))  # all local directories: fine


def test_building_the_index_reports_its_progress_and_the_summary_gives_time_to_searchable(
    env, papers_file, capsys, monkeypatch
):
    """`index` shows the build (finish_bulk) as a phase of its own, a shard at a time, and its summary says
    when the index became searchable (the build included)."""
    from indexer.store.edge import EdgeStore

    seen = []
    inner = EdgeStore.finish_bulk

    def finish_bulk(self, progress=None):
        return inner(self, lambda done, parts: (seen.append((done, parts)), progress(done, parts)))

    monkeypatch.setattr(EdgeStore, "finish_bulk", finish_bulk)
    code, out, err = run(capsys, "index", str(papers_file))
    assert code == 0, err
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # the papers' shard and two chunk shards
    indexed, searchable = map(float, re.search(r"in ([\d.]+)s, searchable after ([\d.]+)s", out).groups())
    assert searchable >= indexed
    code, out, _ = run(capsys, "index", str(papers_file), "-q", "--json")
    assert json.loads(out)["searchable_s"] > 0
