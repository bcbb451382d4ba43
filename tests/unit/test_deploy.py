"""The deployment files cannot drift from what the tests run (Docker does not run here).

docker-compose.yml is valid by the Compose Specification's own JSON schema (vendored in
deploy/schema) and names only settings the code has; every image is pinned, and pinned to
what this machine runs the tests with: the Python interpreter, the Debian packages, every
Python package (deploy/constraints.txt), and the shared libraries the embedded Firebird
engine really loads. tests/integration/test_hosts.py then starts the roles from this file.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from etl_tasks.config import Settings
from tests import compose_file
from tests.compose_file import ROOT, SCHEMA
from workers.health import ROLES

# What an operator puts in .env: every variable the file requires, and nothing optional.
VALUES = {"FIREBIRD_PASSWORD": "fb-test", "FLOWER_PASSWORD": "flower-test",
          "GRAFANA_PASSWORD": "grafana-test"}
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
FIREBIRD_DOCKERFILE = ROOT / "deploy" / "firebird" / "Dockerfile"
# Packages the python:*-slim base image has (with apt itself): not installed by our layer.
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}
# The engine takes ib_util (the UDF helper) from the system when a package provides it (here
# Firebird 3's libib-util, for the tests' server) and runs without it otherwise (checked with
# the file hidden): the image needs none.
OPTIONAL_PACKAGES = {"libib-util"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_file.load(VALUES)


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the project's Dockerfile."""
    return {name: s for name, s in compose["services"].items() if s.get("build") == "."}


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(document))


def test_compose_file_is_valid_by_the_compose_specification(compose):
    assert schema_errors(compose) == []
    # The schema does bite: a misspelt key and a wrong value are reported.
    broken = copy.deepcopy(compose)
    broken["services"]["loader"]["restart_policy"] = "always"
    broken["services"]["flower"]["ports"] = "5555:5555"  # a list, not a string
    errors = schema_errors(broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any(e.startswith("services/flower/ports") for e in errors), errors


@pytest.mark.parametrize("variable", sorted(VALUES))
def test_every_password_must_be_given(variable):
    """No service starts with a password nobody chose (`${VAR:?}`)."""
    with pytest.raises(compose_file.MissingVariable, match=variable):
        compose_file.load({k: v for k, v in VALUES.items() if k != variable})


def test_compose_and_image_name_only_settings_the_code_reads(compose):
    known = {f"ETL_{name.upper()}" for name in Settings.model_fields}
    named = set(compose_file.image_env()) | {
        key for service in ours(compose).values() for key in service["environment"]}
    unknown = {k for k in named if k.startswith("ETL_")} - known
    assert unknown == set(), f"not settings of etl_tasks/config.py: {sorted(unknown)}"


def test_every_role_runs_a_module_with_its_health_check_and_restart_policy(compose):
    for name, service in ours(compose).items():
        argv = compose_file.command_argv(service["command"])
        assert argv[:2] == ["python", "-m"], (name, argv)
        module = argv[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), (name, module)
        assert service["restart"] == "unless-stopped", name
        check = compose_file.healthcheck_argv(service["healthcheck"]["test"])
        assert check[:3] == ["python", "-m", "workers.health"], (name, check)
        what = check[3]
        role = module.removeprefix("workers.")
        # A worker is checked as its own role: a fleet checked as a loader finds no process.
        assert what == role if role in ROLES else what.startswith("http://"), (name, what)
    assert compose["services"]["redis"]["restart"] == "unless-stopped"


def test_secrets_named_by_settings_are_mounted(compose):
    sealed = {"fleet", "loader"}  # they read and write staged patient rows
    for name, service in ours(compose).items():
        mounted = {f"/run/secrets/{s}" for s in service.get("secrets", [])}
        files = {v for k, v in service["environment"].items() if k.endswith("_FILE")}
        assert files <= mounted, (name, files - mounted)
        assert service["environment"]["ETL_REDIS_PASSWORD_FILE"] in mounted, name
        has_key = "ETL_STAGING_KEY_FILE" in service["environment"]
        assert has_key == (name in sealed), name
    for name in compose["secrets"]:
        assert any(name in s.get("secrets", []) for s in compose["services"].values()), name


def test_one_writer_and_a_scalable_fleet(compose):
    services = compose["services"]
    warehouse = compose_file.image_env()["ETL_DUCKDB_PATH"].rsplit("/", 1)[0]
    writers = [n for n, s in ours(compose).items()
               if any(v.split(":")[1] == warehouse for v in s.get("volumes", []))]
    # The exporter reads DuckDB read-only; only the loader consumes `load`.
    assert sorted(writers) == ["exporter", "loader"]
    assert services["loader"]["deploy"]["replicas"] == 1
    # --scale needs services without a fixed container name or published port.
    assert "container_name" not in services["fleet"]
    assert "ports" not in services["fleet"]
    assert services["fleet"]["deploy"]["replicas"] >= 2


def test_redis_keeps_its_data_refuses_to_evict_and_asks_for_the_password(compose):
    redis = compose["services"]["redis"]
    script = compose_file.command_argv(redis["command"])[-1]
    assert "--appendonly yes" in script
    assert "--maxmemory-policy noeviction" in script
    assert '--requirepass "$(cat /run/secrets/redis_password)"' in script
    assert redis["secrets"] == ["redis_password"]


def test_flower_is_authenticated(compose):
    env = compose["services"]["flower"]["environment"]
    assert env["FLOWER_BASIC_AUTH"] == "admin:flower-test"


def from_lines(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", path.read_text(), re.MULTILINE)


def test_every_image_is_pinned(compose):
    images = [s["image"] for s in compose["services"].values() if "image" in s and
              "build" not in s] + from_lines(ROOT / "Dockerfile") + from_lines(
        FIREBIRD_DOCKERFILE)
    for image in images:
        tag = image.split("@")[0].rpartition(":")[2]
        assert re.search(r"\d+\.\d+", tag), image
        assert "latest" not in tag, image


def test_the_image_runs_the_interpreter_the_tests_run():
    [base] = from_lines(ROOT / "Dockerfile")
    version = ".".join(map(str, sys.version_info[:3]))
    assert base.startswith(f"python:{version}-slim"), (base, version)


def apt_pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^\s+([a-z0-9][a-z0-9.+-]+)=(\S+)", path.read_text(), re.MULTILINE))


def installed_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{package} is not installed here: `make test` installs it"
    return done.stdout


@pytest.mark.parametrize("dockerfile", [ROOT / "Dockerfile", FIREBIRD_DOCKERFILE],
                         ids=["etl", "firebird"])
def test_debian_packages_are_the_versions_the_tests_ran_with(dockerfile):
    pins = apt_pins(dockerfile)
    assert pins, f"no pinned apt package in {dockerfile}"
    for package, version in pins.items():
        assert installed_version(package) == version, package


def runtime_closure() -> dict[str, str]:
    """Every installed distribution pyproject's dependencies pull in (extras and markers
    followed), with its version: what the image must install."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        todo = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        extras = frozenset(req.extras)
        if (canonicalize_name(req.name), extras) in seen:
            continue
        seen.add((canonicalize_name(req.name), extras))
        dist = metadata.distribution(req.name)
        found[canonicalize_name(req.name)] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in (extras or {""})):
                todo.append(sub)
    return found


def test_constraints_are_the_packages_the_tests_ran_with():
    pinned = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines()
                  if line and not line.startswith("#"))
    expected = runtime_closure()
    listing = "\n".join(f"{n}=={v}" for n, v in sorted(expected.items()))
    assert pinned == expected, f"{CONSTRAINTS} should list, after its comments:\n{listing}"


# Run in a fresh interpreter: which shared libraries does opening an embedded database load,
# beyond those Python and the imported packages had loaded already?
_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from etl_tasks.demo_data import make_billing_db
    from etl_tasks.sources.firebird import FirebirdTarget, connect

    def libraries():
        lines = open("/proc/self/maps").read().splitlines()
        return {line.split()[-1] for line in lines if ".so" in line.split()[-1]}

    before = libraries()
    root = Path(sys.argv[1])
    target = FirebirdTarget(dsn=str(root / "probe.fdb"), user="SYSDBA", password="masterkey",
                            runtime_dir=root / "runtime")
    make_billing_db(target, 10)
    con = connect(target)
    cur = con.cursor()
    cur.execute("SELECT count(*) FROM BILLING_CLAIMS")
    assert cur.fetchone()[0] == 10
    con.close()
    print("\\n".join(sorted(libraries() - before)))
""")


def test_the_image_has_every_library_the_embedded_engine_loads(tmp_path):
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.split()
    site = str(Path(metadata.distribution("firebird-embedded").locate_file("")).resolve())
    system = [lib for lib in loaded if not str(Path(lib).resolve()).startswith(site)]
    assert any("libicuuc" in lib for lib in system), f"ICU not loaded? {loaded}"
    packages = set()
    for lib in system:
        owner = subprocess.run(["dpkg", "-S", str(Path(lib).resolve())], capture_output=True,
                               text=True, check=False)
        assert owner.returncode == 0, f"{lib}: no Debian package owns it"
        packages.add(owner.stdout.split(":")[0])
    missing = packages - set(apt_pins(ROOT / "Dockerfile")) - BASE_IMAGE_PACKAGES - \
        OPTIONAL_PACKAGES
    assert missing == set(), f"the Dockerfile does not install {sorted(missing)}"
