"""Fleet settings: one dataclass, read from LMTEAM_* environment variables, overridable by CLI flags.

Every process of a fleet (the CLI that submits, each worker) builds its settings here, so a worker
started by docker-compose and one started by the embedded default behave the same.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

ENV_PREFIX = "LMTEAM_"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else default


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SettingsError(f"an LMTEAM_ on/off setting takes 1 or 0, got {value!r}")
    return value.lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FleetSettings:
    """How to reach the fleet and how it behaves under faults. Times are seconds, sizes bytes."""

    broker_url: str | None = None
    """Redis URL of the broker (redis://, rediss:// or redis+socket://). None: start an embedded fleet."""
    result_backend: str | None = None
    """The Redis of the store (payloads, checkpoints, job records); defaults to the broker URL.
    Celery keeps no task results: submitters read the store."""
    secret: str = field(default="", repr=False)
    """Fleet secret: HMAC-SHA256 key of every payload. Required on a real fleet."""
    max_payload_bytes: int = 256 * 2**20
    """Largest payload the aggregator will even try to decode."""
    soft_time_limit: float = 3600.0
    """A task past this gets SoftTimeLimitExceeded and records itself as failed."""
    hard_time_limit: float = 3900.0
    """A task past this is killed with its worker process (which is replaced)."""
    visibility_timeout: int = 7200
    """An unacknowledged task is redelivered after this; must exceed the longest task."""
    max_retries: int = 3
    """Retries of a node task that raised, with exponential backoff."""
    retry_backoff: float = 1.0
    """First retry delay; doubles each retry. Celery's retry_backoff counts whole seconds, at least 1."""
    blob_ttl: int = 7 * 86400
    """How long checkpoints, job records and unmerged payloads stay in Redis."""
    heartbeat_s: float = 5.0
    """A worker beats this often; after 3 missed beats `lmteam status` shows it lost."""
    payload_keep_s: int = 0
    """How long a round's payloads stay once it is merged (0: deleted at the merge; more to debug)."""
    job_keep_s: int = 7 * 86400
    """How long a finished job stays in Redis: its record, events and per-round facts (`lmteam status JOB`)."""
    blob_keep_s: int = 86400
    """How long a finished job's blobs (students, experts, probe and eval sets) stay (0: deleted when it
    ends); the submitter's run dir keeps the results. Serving a SmallTalk run by its job id needs them."""
    merge_grace_s: float = 120.0
    """After a two-level round's deadline, how long its root waits for group merges still running;
    the nodes of a group not merged by then count late."""
    task_events: bool | None = None
    """Celery task events, what Flower shows. None: on in `lmteam worker` (a fleet Flower watches), off
    in an embedded fleet (at 64 nodes, rounds took 2.3 s with them, 1.8 s without). Flower turns them on in
    running workers whenever it is connected (its --enable_events, on by default)."""
    serve_batch: int = 16
    """Most prompts a serving replica generates in one forward (those queued for it when it starts one)."""

    @classmethod
    def from_env(cls, **overrides: object) -> FleetSettings:
        """Settings from LMTEAM_* variables; non-None keyword overrides win (CLI flags)."""
        base = cls(
            broker_url=_env("BROKER_URL"),
            result_backend=_env("RESULT_BACKEND"),
            secret=_env("SECRET", "") or "",
            max_payload_bytes=int(_env("MAX_PAYLOAD_BYTES", str(cls.max_payload_bytes))),
            soft_time_limit=float(_env("SOFT_TIME_LIMIT", str(cls.soft_time_limit))),
            hard_time_limit=float(_env("HARD_TIME_LIMIT", str(cls.hard_time_limit))),
            visibility_timeout=int(_env("VISIBILITY_TIMEOUT", str(cls.visibility_timeout))),
            max_retries=int(_env("MAX_RETRIES", str(cls.max_retries))),
            retry_backoff=float(_env("RETRY_BACKOFF", str(cls.retry_backoff))),
            heartbeat_s=float(_env("HEARTBEAT_S", str(cls.heartbeat_s))),
            payload_keep_s=int(_env("PAYLOAD_KEEP_S", str(cls.payload_keep_s))),
            job_keep_s=int(_env("JOB_KEEP_S", str(cls.job_keep_s))),
            blob_keep_s=int(_env("BLOB_KEEP_S", str(cls.blob_keep_s))),
            serve_batch=int(_env("SERVE_BATCH", str(cls.serve_batch))),
            merge_grace_s=float(_env("MERGE_GRACE_S", str(cls.merge_grace_s))),
            task_events=_flag(_env("TASK_EVENTS")),
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url

    def validate(self) -> FleetSettings:
        """Raise SettingsError with an actionable message if the settings cannot work."""
        if self.broker_url is not None:
            scheme = self.broker_url.split("://", 1)[0]
            if scheme not in ("redis", "rediss", "redis+socket"):
                raise SettingsError(
                    f"broker URL must start with redis://, rediss:// or redis+socket://, got {scheme}://")
            if not self.secret:
                raise SettingsError("a fleet needs a shared secret: set LMTEAM_SECRET (same value on every worker)")
        if self.hard_time_limit <= self.soft_time_limit:
            raise SettingsError("LMTEAM_HARD_TIME_LIMIT must be larger than LMTEAM_SOFT_TIME_LIMIT")
        if self.max_retries < 0:
            raise SettingsError("LMTEAM_MAX_RETRIES must be >= 0")
        if min(self.payload_keep_s, self.job_keep_s, self.blob_keep_s) < 0:
            raise SettingsError("LMTEAM_PAYLOAD_KEEP_S, LMTEAM_JOB_KEEP_S and LMTEAM_BLOB_KEEP_S must be >= 0")
        if self.merge_grace_s < 0:
            raise SettingsError("LMTEAM_MERGE_GRACE_S must be >= 0")
        if self.serve_batch < 1:
            raise SettingsError("LMTEAM_SERVE_BATCH must be >= 1")
        return self

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process (a local worker) these same settings."""
        env = {}
        for key, value in asdict(self).items():
            if value is not None:
                env[ENV_PREFIX + key.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    def public_dict(self) -> dict[str, object]:
        """Settings safe to write into a job record: no secret, no password in URLs."""
        d = asdict(self)
        d.pop("secret")
        for key in ("broker_url", "result_backend"):
            if d[key]:
                d[key] = redact_url(d[key])
        return d


def redact_url(url: str) -> str:
    """redis://:pw@host:6379/0 -> redis://:***@host:6379/0"""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"
