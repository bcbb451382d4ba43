"""ETL_REDIS_* settings -> each client's options (etl_tasks/redis_conn.py): what Celery,
kombu and redbeat get, and that what they show of it (`inspect conf`, `inspect stats`,
URLs) holds no password."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from celery.app.utils import filter_hidden_settings
from kombu.connection import Connection
from kombu.utils.json import dumps

from etl_tasks.config import Settings
from etl_tasks.errors import FatalError
from etl_tasks.redis_conn import conn_from

PASSWORD = "p@ss:w/rd"  # URL-special characters on purpose


def test_plain_url_and_password_setting():
    """The project's URL is kept, the password travels apart from it, Celery's backend and
    redbeat get it in settings named password."""
    conn = conn_from(Settings(redis_url="redis://cache:6380/2", redis_password=PASSWORD))
    assert (conn.scheme, conn.nodes, conn.db, conn.password) == ("redis", (("cache", 6380),),
                                                                 2, PASSWORD)
    assert conn.url == "redis://cache:6380/2"
    conf = conn.celery_conf()
    assert conf["result_backend"] == conf["redbeat_redis_url"] == conn.url
    assert conf["redis_password"] == conf["redbeat_redis_options"]["password"] == PASSWORD
    # kombu re-reads credentials from the URL: they are in it, quoted, and parse back.
    assert Connection(conf["broker_url"]).password == PASSWORD
    assert PASSWORD not in conf["broker_url"]


def test_password_in_the_url_is_taken_out_of_it():
    """A password written in ETL_REDIS_URL works, and no shown URL carries it."""
    conn = conn_from(Settings(redis_url="redis://:s3cret@cache:6379/0"))
    assert conn.password == "s3cret"
    assert "s3cret" not in conn.url + conn.where


def test_password_file_wins_over_nothing_and_loses_one_newline(tmp_path: Path):
    """ETL_REDIS_PASSWORD_FILE: a secrets file's trailing newline is not part of the
    password; an unreadable file names the setting."""
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    assert conn_from(Settings(redis_password_file=secret)).password == PASSWORD
    with pytest.raises(FatalError, match="ETL_REDIS_PASSWORD_FILE"):
        conn_from(Settings(redis_password_file=tmp_path / "missing"))


def test_sentinel_urls_need_a_master_name():
    """sentinel:// lists the sentinels; without ETL_REDIS_MASTER_NAME it is refused, naming
    the setting."""
    url = "sentinel://s1:26379/1;sentinel://s2:26380"
    with pytest.raises(FatalError, match="ETL_REDIS_MASTER_NAME"):
        conn_from(Settings(redis_url=url))
    conn = conn_from(Settings(redis_url=url, redis_master_name="etl", redis_password=PASSWORD,
                              redis_sentinel_password="sentinel-" + PASSWORD))
    assert conn.nodes == (("s1", 26379), ("s2", 26380))
    assert conn.db == 1
    conf = conn.celery_conf()
    assert conf["broker_transport_options"]["master_name"] == "etl"
    assert conf["result_backend_transport_options"]["master_name"] == "etl"
    beat = conf["redbeat_redis_options"]
    assert conf["redbeat_redis_url"].startswith("redis-sentinel://")  # redbeat's switch
    assert (beat["sentinels"], beat["service_name"], beat["db"]) == (list(conn.nodes), "etl", 1)
    # Every sentinel URL carries the credentials: kombu moves between them.
    assert [Connection(u).password for u in conf["broker_url"].split(";")] == [PASSWORD] * 2


def test_what_celery_shows_holds_no_password():
    """`inspect conf` (filter_hidden_settings) and `inspect stats` (the transport options as
    kombu's JSON) show neither the master's nor the sentinels' password."""
    conn = conn_from(Settings(redis_url="sentinel://s1:26379;sentinel://s2:26379",
                              redis_master_name="etl", redis_password=PASSWORD,
                              redis_sentinel_password="sentinel-" + PASSWORD))
    conf = conn.celery_conf()
    shown = json.loads(dumps(filter_hidden_settings(conf)))
    stats = dumps(conf["broker_transport_options"])
    for text in (json.dumps(shown), stats, repr(conn), conn.where):
        assert "p@ss" not in text
        assert "p%40ss" not in text
    assert "********" in stats


def test_tls():
    """rediss:// (or ETL_REDIS_TLS with Sentinel) verifies the server against the CA file;
    the same options reach kombu, the result backend, redbeat and the sentinels."""
    conn = conn_from(Settings(redis_url="rediss://cache:6379/0", redis_tls_ca_file="/ca.pem"))
    assert conn.tls
    assert conn.url.startswith("rediss://")
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    conf = conn.celery_conf()
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == expected
    assert conf["redbeat_redis_use_ssl"] == expected
    sentinel = conn_from(Settings(redis_url="sentinel://s1:26379", redis_master_name="etl",
                                  redis_tls=True, redis_tls_ca_file="/ca.pem"))
    assert sentinel.sentinel_options()["ssl"] is True
    assert sentinel.sentinel_options()["ssl_ca_certs"] == "/ca.pem"
    plain = conn_from(Settings(redis_url="redis://cache:6379/0"))
    assert plain.celery_conf()["broker_use_ssl"] is False


@pytest.mark.parametrize("url", ["http://x:1", "redis://a:1;redis://b:2", "redis://a:port/0",
                                 "redis://:secret@a:1/x"])
def test_bad_urls_are_refused_without_their_password(url: str):
    """A malformed ETL_REDIS_URL is a FatalError naming the setting, its password masked."""
    with pytest.raises(FatalError, match="ETL_REDIS_URL") as caught:
        conn_from(Settings(redis_url=url))
    assert "secret" not in str(caught.value)
