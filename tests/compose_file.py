"""docker-compose.yml and the Dockerfile as data, for the tests that keep them from drifting.

`load` reads the compose file as Compose does: YAML (merge keys and anchors included), then
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`,
`${VAR:+other}` and `$$` interpolated from the environment given. `role` turns one service
into the command, environment and health check a test host runs it with: the image's ENV
(read from the Dockerfile, for services built from it) under the service's `environment`,
`python` the test's interpreter, compose service names in ETL_REDIS_URL and ETL_FIREBIRD_DSN
replaced by the test hosts' addresses, and container paths rewritten: a volume's or a
secret's path to the folder or file the test gives for it, any other absolute path to the
host's private folder (what a container's own filesystem would be).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
                  r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(KeyError):
    """A `${VAR:?message}` whose variable is unset (Compose refuses to start)."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string value (not keys) under `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        present = name in env
        usable = present and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return env[name] if usable else arg
        if op in (":?", "?"):
            if not usable:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if usable else ""
        return env.get(name, "")

    return _VAR.sub(one, value)


def load(env: dict[str, str]) -> dict[str, Any]:
    with COMPOSE.open() as f:
        return interpolate(yaml.safe_load(f), env)  # type: ignore[no-any-return]


def image_env() -> dict[str, str]:
    """The ENV the Dockerfile sets (KEY=value pairs, lines joined at a trailing backslash)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for pair in shlex.split(line.strip()[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def command_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_argv(test: str | list[str]) -> list[str]:
    """A compose health check's `test` as a command line (CMD, CMD-SHELL or a string)."""
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    return ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest


@dataclass(frozen=True)
class Role:
    """One compose service as a test host runs it."""

    service: str
    argv: list[str]
    env: dict[str, str]
    health: list[str] | None


class Mounts:
    """Where a service's container paths are on a test host."""

    def __init__(self, service: dict[str, Any], volumes: dict[str, Path],
                 secrets: dict[str, Path], private: Path) -> None:
        self.private = private
        self.targets: dict[str, Path] = {}
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            self.targets[target] = (ROOT / source).resolve() if source.startswith(".") \
                else volumes[source]
        for secret in service.get("secrets", []):
            name = secret if isinstance(secret, str) else secret["source"]
            target = f"/run/secrets/{name}" if isinstance(secret, str) else \
                secret.get("target", f"/run/secrets/{name}")
            self.targets[target] = secrets[name]

    def path(self, container_path: str) -> str:
        """A container path on this host: under a mount, or in the host's private folder."""
        for target in sorted(self.targets, key=len, reverse=True):
            if container_path == target or container_path.startswith(target + "/"):
                return str(self.targets[target]) + container_path[len(target):]
        return str(self.private) + container_path

    def text(self, text: str) -> str:
        """`text` (a command line, a shell script) with every mounted path rewritten."""
        for target in sorted(self.targets, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])",
                          str(self.targets[target]), text)
        return text


def role(compose: dict[str, Any], service: str, *, hosts: dict[str, str],
         volumes: dict[str, Path], secrets: dict[str, Path], private: Path) -> Role:
    """The command, environment and health check of `service` on a test host.

    `hosts` maps compose service names to addresses; `volumes` and `secrets` name the test's
    folder or file for each named volume and secret (as in Compose, one project-wide set);
    `private` is this host's own folder."""
    spec = compose["services"][service]
    mounts = Mounts(spec, volumes, secrets, private)
    ours = spec.get("build") in (".", "./")  # built from the project's Dockerfile
    env = {**(image_env() if ours else {}),
           **{k: "" if v is None else str(v) for k, v in (spec.get("environment") or {}).items()}}
    for key, value in env.items():
        server = _DSN.match(value) if key == "ETL_FIREBIRD_DSN" else None
        if key == "ETL_REDIS_URL":
            env[key] = _redis_url(value, hosts)
        elif server is not None:
            # A server DSN's path is a file on the server: where its volume holds it here.
            name = server["host"]
            on_server = Mounts(compose["services"][name], volumes, secrets, private)
            env[key] = f"{hosts.get(name, name)}{server['port'] or ''}:" \
                       f"{on_server.path(server['path'])}"
        elif value.startswith("/"):
            env[key] = mounts.path(value)
    argv = [_python(arg) for arg in (mounts.text(a) for a in command_argv(spec["command"]))]
    check = spec.get("healthcheck", {}).get("test")
    health = None if check is None else \
        [_python(mounts.text(a)) for a in healthcheck_argv(check)]
    return Role(service, argv, env, health)


def _python(arg: str) -> str:
    return sys.executable if arg == "python" else arg


def _redis_url(url: str, hosts: dict[str, str]) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = parts.netloc.replace(host, hosts.get(host, host), 1)
    return urlunsplit(parts._replace(netloc=netloc))


# A Firebird server DSN, host[/port]:/path (a plain path is the embedded engine).
_DSN = re.compile(r"^(?P<host>[\w.-]+)(?P<port>/\d+)?:(?P<path>/.*)$")
