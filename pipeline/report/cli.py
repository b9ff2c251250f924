"""`lmteam report JOB`: draw a job's report as a self-contained HTML page plus PNG figures.

JOB is a report.json, a run directory, a job id under runs/, or (with --broker) a job in the
fleet's Redis, tried in that order so that reading a local file never needs a network.
cli.py adds this command to `lmteam` (main.add_command(report)).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

SWEEP = Path("bench/results/fpld_bits.json")
REPO_SWEEP = Path(__file__).resolve().parent.parent / SWEEP  # the same file when run from elsewhere


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path} is not a job report (expected a JSON object)")
    return data


def _from_disk(job: str) -> tuple[dict, Path] | None:
    """The report and its run directory, from a path or runs/<job>/report.json."""
    path = Path(job)
    for candidate in (path, path / "report.json", Path("runs") / job / "report.json"):
        if candidate.is_file():
            return _load(candidate), candidate.parent
    return None


def _from_broker(url: str, job: str) -> dict | None:
    """The report the driver stored in the job record; None when Redis has no such job."""
    import redis

    from broker.jobs import JobRecord, UnknownJob
    from broker.store import connect

    try:
        record = JobRecord(connect(url, outage_s=3.0), job).get()  # a short retry: the user is waiting
    except UnknownJob:
        return None
    except redis.exceptions.AuthenticationError:
        raise click.ClickException("Redis refused the password in the broker URL") from None
    except redis.exceptions.RedisError as e:
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise click.ClickException(f"cannot reach Redis: {reason}") from None
    if not isinstance(record.get("report"), dict):
        raise click.ClickException(f"job {job} has no report yet (status {record.get('status', 'unknown')})")
    return record["report"]


def _sweep(path: Path | None, rep: dict) -> dict | None:
    """The bits sweep across jobs: the one given, else the bench's result file when it was run on
    the same corpus as this job (a sweep on other data is not comparable)."""
    if path is not None:
        return _load(path)
    if rep.get("kind") != "fpld":
        return None
    default = next((p for p in (SWEEP, REPO_SWEEP) if p.is_file()), None)
    sweep = _load(default) if default is not None else None
    same_data = sweep is not None and sweep.get("config", {}).get("corpus") == rep.get("config", {}).get("corpus")
    return sweep if same_data else None


@click.command("report")
@click.argument("job")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.html and the PNGs [default: the run directory, or runs/<job>].")
@click.option("--sweep", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"A sweep across jobs to plot (rows of bits, student_ppl, teacher_kl) [default: {SWEEP} "
                   "if it exists and was run on this job's corpus].")
@click.option("--broker", envvar="LMTEAM_BROKER_URL", default=None, metavar="URL",
              help="Redis URL of a fleet (env LMTEAM_BROKER_URL): read the report from the job record "
                   "when no report.json is found on disk.")
def report(job: str, out: Path | None, sweep: Path | None, broker: str | None) -> None:
    """Write a self-contained HTML report (plots and team metrics) for JOB.

    JOB is a report.json, a run directory, a job id under runs/, or a job id in the fleet's Redis.
    Prints the path of report.html.
    """
    found = _from_disk(job)
    if found is None and broker:
        rep = _from_broker(broker, job)
        found = (rep, Path("runs") / job) if rep is not None else None
    if found is None:
        where = f"looked in {Path('runs') / job / 'report.json'}" + (f", {Path(job) / 'report.json'}"
                                                                    if Path(job).is_dir() else "") + (
            " and the fleet's Redis" if broker else "; pass --broker URL to read it from a fleet")
        raise click.ClickException(f"no report for job {job}: {where}")
    rep, run_dir = found

    from pipeline.report.html import render_report  # matplotlib loads only when there is something to draw

    paths = render_report(rep, out or run_dir, sweep=_sweep(sweep, rep))
    click.echo(str(paths[0].resolve()))


if __name__ == "__main__":
    report()
