"""Refuse, up front and in one line, a process that could never work with this fleet.

Redis checks the password. The fleet secret (HMAC key of every payload) cannot be checked by
Redis, so the first process that uses a Redis leaves a fingerprint of its secret there (an HMAC
of a fixed string: it reveals nothing about the secret); every later worker or submitter with a
different secret is refused at start, instead of having all its payloads rejected one by one.
"""

from __future__ import annotations

import hashlib
import hmac

import redis

from broker import keys
from broker.store import connect

FINGERPRINT_KEY = keys.SECRET_FINGERPRINT


class FleetAuthError(RuntimeError):
    """Wrong Redis password, unreachable Redis, or a fleet secret that differs from the fleet's."""


def fingerprint(secret: str) -> str:
    return hmac.new(secret.encode(), b"lmteam fleet secret check v1", hashlib.sha256).hexdigest()[:32]


def connect_checked(url: str) -> redis.Redis:
    """A client that has answered PING, or FleetAuthError saying what is wrong."""
    try:
        # One try, no retries: redis-py counts a wrong password as a connection error and would
        # otherwise retry it for the whole outage window.
        connect(url, outage_s=0).ping()
    except redis.exceptions.AuthenticationError:
        raise FleetAuthError("Redis refused the password in the broker URL (check LMTEAM_BROKER_URL)") from None
    except redis.exceptions.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise FleetAuthError("Redis needs a password: put it in the URL, redis://:PASSWORD@host:6379/0") from None
        raise
    except redis.exceptions.ConnectionError as e:
        raise FleetAuthError(f"cannot reach Redis at the broker URL: {str(e).splitlines()[0]}") from None
    return connect(url)


def check_fleet_secret(client: redis.Redis, secret: str) -> None:
    """Register this fleet's secret fingerprint, or refuse a secret that differs from it."""
    mine = fingerprint(secret)
    client.set(FINGERPRINT_KEY, mine, nx=True)
    theirs = client.get(FINGERPRINT_KEY)
    if theirs is not None and theirs.decode() != mine:
        raise FleetAuthError("LMTEAM_SECRET differs from the secret this fleet already uses; every payload "
                             "signed with it would be rejected. Use the fleet's secret.")
