"""Where Redis is and how to reach it: the ETL_REDIS_* settings translated for every client.

One `RedisConn` feeds the project's own client (`client()`: redis-py, or with Sentinel
`Sentinel(...).master_for(...)`, which asks the sentinels for the master at every
(re)connection, so it follows a failover), Celery's broker (kombu's redis or sentinel
transport), its result backend and beat's redbeat (`celery_conf()`). Where a password goes:
the result backend and redbeat take it in settings named password (Celery's `inspect conf`
censors those; their URLs carry none); the broker in its URLs, because kombu re-reads the
credentials from the next URL when it moves to another sentinel, and Celery and kombu mask
the broker URLs wherever they show them; the sentinels' own in a `Credentials` that prints
as ******** (it sits in transport options, which `inspect stats` shows as they are).
`check()` turns a
refused password, an unknown master name or a failed TLS handshake into a FatalError naming
the setting to fix; Celery would retry those for ever.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from celery.app.amqp import AMQP
from kombu.connection import Connection
from pydantic import SecretStr
from redis.credentials import CredentialProvider
from redis.sentinel import MasterNotFoundError, Sentinel

from etl_tasks.config import Settings
from etl_tasks.errors import FatalError

SCHEMES = ("redis", "rediss", "sentinel")
# A sentinel answers small questions; one that does not answer within this is skipped for
# the next, instead of holding up every (re)connection.
SENTINEL_TIMEOUT_S = 2.0
PASSWORD_SETTINGS = "ETL_REDIS_PASSWORD (or ETL_REDIS_PASSWORD_FILE; ETL_REDIS_USERNAME for " \
                    "an ACL user)"


class Credentials(CredentialProvider):
    """A password redis-py asks for when it connects, shown as ******** wherever it is
    printed or sent as JSON (Celery's `inspect stats` and `conf` answers, Flower)."""

    def __init__(self, password: str) -> None:
        self._password = password

    def get_credentials(self) -> tuple[str]:
        return (self._password,)

    def __repr__(self) -> str:
        return "Credentials(********)"

    def __json__(self) -> str:  # kombu's JSON encoder
        return "********"


class BrokerConnection(Connection):
    """kombu's Connection (5.7.0), leaving alone a channel whose transport kombu already let
    go of. When the broker dies during a BRPOP, closing the channel fails once,
    Connection.collect drops the transport anyway, and Celery's close then closes the channel
    again, which rebuilds a Redis pool from the (gone) transport's settings: the
    AttributeError ended the worker ("Unrecoverable error") at a Sentinel failover. The
    channel's unacknowledged messages stay in Redis's unacked hash: the supervisor sends
    their steps again long before the visibility timeout restores them."""

    def maybe_close_channel(self, channel: Any) -> None:
        transport = getattr(channel, "connection", None)
        if transport is not None and getattr(transport, "client", True) is None:
            return
        super().maybe_close_channel(channel)  # type: ignore[no-untyped-call]


class CeleryAMQP(AMQP):  # type: ignore[misc]  # celery is untyped
    """Celery's AMQP with the connection above (the worker's consumer; kombu's pools make
    their own): the app's `amqp` (etl_tasks/celery.py)."""

    Connection = BrokerConnection


@dataclass(frozen=True)
class RedisConn:
    """A Redis server (redis, rediss) or the sentinels of a master (sentinel), with the
    credentials and TLS files to reach it. `url` carries neither: it is safe to show."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]
    """The server, or every sentinel."""
    db: int = 0
    master_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def sentinel(self) -> bool:
        return self.scheme == "sentinel"

    @property
    def url(self) -> str:
        """The address with no credentials: for messages, and Celery's broker and backend."""
        if self.sentinel:
            return ";".join(f"sentinel://{host}:{port}/{self.db}" for host, port in self.nodes)
        host, port = self.nodes[0]
        return f"{'rediss' if self.tls else 'redis'}://{host}:{port}/{self.db}"

    @property
    def broker_url(self) -> str:
        """`url` with the credentials in each part (see the module docstring)."""
        if self.password is None and self.username is None:
            return self.url
        userinfo = quote(self.username or "", safe="") + (
            "" if self.password is None else ":" + quote(self.password, safe="")) + "@"
        return ";".join(part.replace("://", "://" + userinfo, 1)
                        for part in self.url.split(";"))

    @property
    def where(self) -> str:
        """The address for a message: the URL, and the master's name with Sentinel."""
        return f"{self.url} (master {self.master_name!r})" if self.sentinel else self.url

    def tls_options(self) -> dict[str, Any]:
        """redis-py's ssl_* arguments (also Celery's broker_use_ssl); {} without TLS. The
        server's certificate is always verified, its name included."""
        if not self.tls:
            return {}
        files = {"ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file,
                 "ssl_keyfile": self.key_file}
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                **{key: value for key, value in files.items() if value}}

    def sentinel_options(self) -> dict[str, Any]:
        """How the sentinels themselves are reached (redis-py's sentinel_kwargs)."""
        options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S,
                                   "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if self.sentinel_password:
            options["credential_provider"] = Credentials(self.sentinel_password)
        if self.tls:
            options.update(ssl=True, **self.tls_options())
        return options

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client; with Sentinel, one that asks the sentinels where the master is
        whenever it (re)connects. `options`: socket timeouts, decode_responses..."""
        credentials: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.sentinel:
            sentinels = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it bare
                list(self.nodes), sentinel_kwargs=self.sentinel_options())
            master: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
                self.master_name, db=self.db, ssl=self.tls, **self.tls_options(),
                **credentials, **options)
            return master
        host, port = self.nodes[0]
        return redis.Redis(host=host, port=port, db=self.db, ssl=self.tls,
                           **self.tls_options(), **credentials, **options)

    def celery_conf(self) -> dict[str, Any]:
        """Celery's broker and result backend and redbeat's settings. The *_options dicts
        hold only what this Redis needs: merge them into the app's own (celery.use_redis)."""
        tls = self.tls_options() or False
        if self.sentinel:
            sentinel = {"master_name": self.master_name,
                        "sentinel_kwargs": self.sentinel_options()}
            # redbeat takes Sentinel from its options when its URL says redis-sentinel.
            beat_url = self.url.replace("sentinel://", "redis-sentinel://")
            beat = {"sentinels": list(self.nodes), "service_name": self.master_name,
                    "db": self.db, "password": self.password, "username": self.username,
                    "sentinel_kwargs": self.sentinel_options()}
        else:
            sentinel, beat_url = {}, self.url
            beat = {"password": self.password, "username": self.username}
        return {
            "broker_url": self.broker_url, "broker_use_ssl": tls,
            "broker_transport_options": sentinel,
            "result_backend": self.url, "redis_username": self.username,
            "redis_password": self.password, "redis_backend_use_ssl": tls,
            "result_backend_transport_options": sentinel,
            "redbeat_redis_url": beat_url, "redbeat_redis_use_ssl": tls,
            "redbeat_redis_options": beat,
        }

    def explain(self, exc: BaseException) -> str | None:
        """What to fix when `exc`, or the error it was raised from (kombu wraps redis-py's),
        says the settings are wrong (not that Redis is down)."""
        cause = exc.__cause__ or exc.__context__
        if not isinstance(exc, redis.RedisError) and cause is not None:
            return self.explain(cause)
        if isinstance(exc, redis.AuthenticationError):
            if self.password is None:
                return (f"Redis at {self.where} requires a password and none is set: set "
                        f"{PASSWORD_SETTINGS}")
            return (f"Redis at {self.where} refused the password ({exc}): set "
                    f"{PASSWORD_SETTINGS} to the server's password")
        if isinstance(exc, MasterNotFoundError):
            return (f"no sentinel of {self.url} names a master {self.master_name!r}: check "
                    "ETL_REDIS_MASTER_NAME (the name of the sentinels' `sentinel monitor`), "
                    "ETL_REDIS_SENTINEL_PASSWORD, and that a sentinel is up")
        if isinstance(exc, redis.ConnectionError) and _tls_failure(exc):
            return (f"the TLS handshake with Redis at {self.where} failed ({exc}): check "
                    "ETL_REDIS_TLS_CA_FILE (the CA that signed the server's certificate, "
                    "which must name the host connected to) and ETL_REDIS_TLS_CERT_FILE / "
                    "ETL_REDIS_TLS_KEY_FILE when the server asks for a client certificate")
        return None

    def check(self) -> None:
        """Ask the sentinels, then the server: FatalError naming the setting when the
        settings are wrong. An unreachable Redis passes: it may come up (callers retry)."""
        if self.sentinel:
            self._check_sentinels()
        client = self.client(socket_timeout=SENTINEL_TIMEOUT_S,
                             socket_connect_timeout=SENTINEL_TIMEOUT_S)
        try:
            client.ping()
        except redis.RedisError as exc:
            message = self.explain(exc)
            if message is not None and not isinstance(exc, MasterNotFoundError):
                raise FatalError(message) from None
        finally:
            client.close()

    def _check_sentinels(self) -> None:
        unknown = refused = 0
        for host, port in self.nodes:
            node = redis.Redis(host=host, port=port, **self.sentinel_options())
            try:
                if node.sentinel_get_master_addr_by_name(self.master_name):
                    return
                unknown += 1
            except redis.AuthenticationError:
                refused += 1
            except redis.ConnectionError as exc:
                if _tls_failure(exc):
                    raise FatalError(str(self.explain(exc))) from None
            except redis.ResponseError:  # a sentinel with no master of that name
                unknown += 1
            finally:
                node.close()
        if refused:
            raise FatalError(f"the sentinels of {self.url} refused the password: set "
                             "ETL_REDIS_SENTINEL_PASSWORD (or ..._FILE) to their requirepass")
        if unknown:
            raise FatalError(f"no sentinel of {self.url} monitors a master named "
                             f"{self.master_name!r}: set ETL_REDIS_MASTER_NAME to the name of "
                             "their `sentinel monitor`")


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _secret(value: SecretStr | None, path: Path | None, setting: str) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise FatalError(f"cannot read {setting}_FILE {path}: {exc.strerror}") from None
    return text[:-1] if text.endswith("\n") else text


def conn_from(settings: Settings, url: str | None = None) -> RedisConn:
    """The RedisConn of the settings (`url` instead of ETL_REDIS_URL when given). A password
    in the URL is accepted when ETL_REDIS_PASSWORD(_FILE) is unset, and taken out of it."""
    url = url or settings.redis_url
    parts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
    schemes = {part.scheme for part in parts}
    if not parts or len(schemes) != 1 or not schemes <= set(SCHEMES) or \
            (len(parts) > 1 and schemes != {"sentinel"}):
        raise FatalError(f"ETL_REDIS_URL must be redis://host:port/db, rediss://host:port/db "
                         f"or sentinel://host:port/db;sentinel://host2:port, not "
                         f"{_masked(url)!r}")
    first = parts[0]
    scheme = first.scheme
    try:
        nodes = tuple((p.hostname or "127.0.0.1", p.port or (26379 if scheme == "sentinel"
                                                             else 6379)) for p in parts)
        db = int(first.path.strip("/") or 0)
    except ValueError:
        raise FatalError(f"ETL_REDIS_URL has a bad port or database number: "
                         f"{_masked(url)!r}") from None
    if scheme == "sentinel" and not settings.redis_master_name:
        raise FatalError("ETL_REDIS_URL names sentinels: set ETL_REDIS_MASTER_NAME to the "
                         "name they monitor the master under")
    password = _secret(settings.redis_password, settings.redis_password_file,
                       "ETL_REDIS_PASSWORD")
    tls = scheme == "rediss" or settings.redis_tls
    return RedisConn(
        scheme="rediss" if scheme == "redis" and tls else scheme, nodes=nodes, db=db,
        master_name=settings.redis_master_name if scheme == "sentinel" else None,
        username=settings.redis_username or (unquote(first.username) if first.username
                                             else None),
        password=password if password is not None else (
            unquote(first.password) if first.password else None),
        sentinel_password=_secret(settings.redis_sentinel_password,
                                  settings.redis_sentinel_password_file,
                                  "ETL_REDIS_SENTINEL_PASSWORD"),
        tls=tls, **{name: str(path) if path else None for name, path in (
            ("ca_file", settings.redis_tls_ca_file),
            ("cert_file", settings.redis_tls_cert_file),
            ("key_file", settings.redis_tls_key_file))})


def _masked(url: str) -> str:
    """`url` with any password replaced by ***, for a message about a bad URL."""
    masked = []
    for part in url.split(";"):
        split = urlsplit(part)
        if split.password:
            user = split.username or ""
            netloc = f"{user}:***@" + split.netloc.rsplit("@", 1)[1]
            part = split._replace(netloc=netloc).geturl()
        masked.append(part)
    return ";".join(masked)
