"""What every command group shares: the fleet options, and one readable line and a non-zero exit
for every failure a user can cause, never a traceback.

Shared by every command group (cli.py, pipeline/rag/cli.py, pipeline/smalltalk/cli.py). Error
classes are looked up only in modules already imported: a module never imported cannot have
raised, and a fast command (`rag query`) must not import torch just to name CorpusError.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

EXIT_FAILED = 1

# Bad input: click's usage error (exit 2).
USAGE_ERRORS = (("pipeline.data", "CorpusError"), ("pipeline.job_config", "ConfigError"),
                ("broker.settings", "SettingsError"), ("pipeline.models.spec", "ModelError"))
# The job or the fleet could not do it: "Error: ..." (exit 1).
FAILURES = (("broker.embedded", "EmbeddedError"), ("broker.jobs", "UnknownJob"), ("broker.auth", "FleetAuthError"),
            ("broker.jobs", "JobFailed"))


def _loaded(pairs: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules[m], name, None) for m, name in pairs if m in sys.modules)
    return tuple(c for c in found if c is not None)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except _loaded(USAGE_ERRORS) as e:
            raise click.UsageError(str(e)) from None
        except _loaded(FAILURES) as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_FAILED)
        except redis.exceptions.AuthenticationError:
            click.echo("Error: Redis refused the password in the broker URL", err=True)
            sys.exit(EXIT_FAILED)
        except redis.exceptions.ConnectionError as e:
            click.echo(f"Error: cannot reach Redis: {str(e).splitlines()[0]}", err=True)
            sys.exit(EXIT_FAILED)
        except KeyboardInterrupt:
            click.echo("interrupted; local fleet stopped", err=True)
            sys.exit(130)

    return wrapper


broker_option = click.option("--broker", envvar="LMTEAM_BROKER_URL", default=None, metavar="URL",
                             help="Redis URL of a fleet (env LMTEAM_BROKER_URL). Omit it to run on an "
                                  "embedded private Redis with local workers.")
secret_option = click.option("--secret", envvar="LMTEAM_SECRET", default=None, metavar="TEXT",
                             help="Fleet secret that signs every payload (env LMTEAM_SECRET); "
                                  "generated for an embedded run.")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def sigterm_unwinds() -> None:
    """SIGTERM unwinds like Ctrl-C, so an embedded fleet is torn down either way."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
