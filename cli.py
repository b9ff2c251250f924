"""lmteam: run a team of language models as a distributed system.

Without --broker (and without LMTEAM_BROKER_URL) every job command starts a private Redis and
local worker processes, runs, and cleans up. With --broker redis://... it submits to a fleet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from broker.settings import FleetSettings, SettingsError
from pipeline.cli_errors import broker_option, one_line_errors, secret_option


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lmteam")
def main() -> None:
    """Run a team of small language models as a distributed system.

    \b
    Quick start (no setup; starts a private Redis and local workers):
      lmteam fpld                          # federated distillation on the built-in corpus
      lmteam fpld --nodes 4 --bits 4 --corpus a.txt --corpus b.txt
    \b
    On a fleet (see README: docker compose up):
      lmteam worker --role node --node-id 0 --data private.txt --broker redis://:pw@host:6379/0
      lmteam fpld --broker redis://:pw@host:6379/0 --corpus public.txt
    """


@main.command()
@click.option("--role", type=click.Choice(["node", "aggregator", "expert"]), required=True,
              help="node: holds private data and serves queue node.<id>; aggregator: merges and distills.")
@click.option("--node-id", type=int, default=None, help="This node's id (role node); it consumes queue node.<id>.")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Private text file(s) of this node (role node); repeat for several.")
@click.option("--threads", default=1, show_default=True, help="Torch threads per task.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Node-local state (e.g. retrieval indexes) [default: ./lmteam-state/<name>].")
@click.option("--concurrency", default=1, show_default=True, help="Worker processes (prefork pool).")
@click.option("--name", default=None,
              help="Worker name, unique on this host, e.g. expert1 to run a second expert worker "
                   "[default: node<id>, or the role].")
@click.option("--model", "models", multiple=True, metavar="DIR|ALIAS",
              help="A local HF model folder this worker may serve (repeat for several): a job naming a model "
                   "with the same weights' hash uses this copy, wherever the submitter keeps its own.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps: overrides the job's --device here.")
@click.option("--serve", "serve", default=None, metavar="RUN",
              help="Role expert: serve an expert of this finished SmallTalk run (a run dir, or a job id in the "
                   "fleet's store) on queue expert.<I>, instead of training on queue experts.")
@click.option("--expert", "expert", type=int, default=None, help="With --serve: which expert I (replicas share I).")
@click.option("--loglevel", default="info", show_default=True)
@broker_option
@secret_option
@one_line_errors
def worker(role, node_id, data, threads, state_dir, concurrency, name, models, device, serve, expert, loglevel,
           broker, secret) -> None:
    """Start a worker (a thin wrapper over `celery worker`).

    \b
    lmteam worker --role node --node-id 3 --data shard3.txt
    lmteam worker --role aggregator
    lmteam worker --role expert --name expert1   # a second expert worker on the same host
    lmteam worker --role expert --serve runs/JOB --expert 2 --name e2r1   # a replica of expert 2
    """
    from broker import keys
    from pipeline.data import load_corpus

    settings = FleetSettings.from_env(broker_url=broker, secret=secret)
    if settings.broker_url is None:
        raise SettingsError("a worker needs a broker: pass --broker redis://... or set LMTEAM_BROKER_URL")
    settings.validate()
    from broker.auth import check_fleet_secret, connect_checked

    client = connect_checked(settings.backend_url)
    check_fleet_secret(client, settings.secret)
    if (serve is None) != (expert is None) or (serve is not None and role != "expert"):
        raise click.UsageError("--serve RUN and --expert I go together, with --role expert")
    if serve is not None:
        from pipeline.smalltalk.serve_driver import open_served

        open_served(serve, client).check_expert(expert)  # a wrong run or index fails here, in one line
        serve = str(Path(serve).resolve()) if Path(serve).exists() else serve
        queue, default_name = keys.expert_queue(expert), f"expert{expert}"
    elif role == "node":
        if node_id is None or not data:
            raise click.UsageError("--role node needs --node-id and --data")
        load_corpus([str(p) for p in data])  # refuse to start on a missing/empty/binary file
        queue, default_name = keys.node_queue(node_id), f"node{node_id}"
    else:
        queue, default_name = (keys.AGGREGATOR_QUEUE if role == "aggregator" else keys.EXPERT_QUEUE), role
    name = name or default_name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise click.BadParameter(f"{name!r}: use letters, digits, '-' and '_'", param_hint="--name")
    os.environ.update({**settings.to_env(), "LMTEAM_ROLE": role, "LMTEAM_QUEUE": queue, "LMTEAM_WORKER_NAME": name,
                       "LMTEAM_THREADS": str(threads),
                       "LMTEAM_STATE_DIR": str((state_dir or Path("lmteam-state") / name).resolve()),
                       "LMTEAM_NODE_DATA": os.pathsep.join(str(Path(p).resolve()) for p in data)})
    if node_id is not None:
        os.environ["LMTEAM_NODE_ID"] = str(node_id)
    if serve is not None:
        os.environ.update({"LMTEAM_SERVE_RUN": serve, "LMTEAM_SERVE_EXPERT": str(expert)})
    if models:
        from pipeline.models.spec import resolve_source

        os.environ["LMTEAM_MODELS"] = os.pathsep.join(resolve_source(m) for m in models)
    if device:
        from pipeline.models.lm import resolve_device

        os.environ["LMTEAM_DEVICE"] = resolve_device(device)
    from broker.app import app, configure

    configure(app, settings, queues=(queue,) if role == "node" or serve is not None else ())
    app.worker_main(["worker", "-Q", queue, "-c", str(concurrency), "-P", "prefork", "-n", f"{name}@%h",
                     "-l", loglevel, "--without-gossip", "--without-mingle"])


flower_option = click.option("--flower-url", envvar="LMTEAM_FLOWER_URL", default="http://localhost:5555",
                             show_default=True, help="Where the fleet's Flower runs (env LMTEAM_FLOWER_URL).")


@main.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the raw job record.")
@broker_option
@flower_option
@one_line_errors
def status(job, as_json, broker, flower_url) -> None:
    """Workers and recent jobs, or one job's progress per round and node (reads the fleet's Redis)."""
    from broker.auth import connect_checked
    from broker.jobs import JobRecord, list_jobs
    from pipeline.report.status import print_fleet, print_job

    if not broker:
        raise SettingsError("status reads a fleet's Redis: pass --broker redis://... or set LMTEAM_BROKER_URL")
    client = connect_checked(broker)
    if job is None:
        print_fleet(client, list_jobs(client), flower_url)
        return
    rec = JobRecord(client, job).get()
    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
        return
    print_job(client, rec | {"id": job}, flower_url)


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--basic-auth", envvar="FLOWER_BASIC_AUTH", required=True, metavar="USER:PASSWORD",
              help="Flower login (env FLOWER_BASIC_AUTH); required, the dashboard can revoke tasks.")
@broker_option
@one_line_errors
def flower(port, address, basic_auth, broker) -> None:
    """Start Flower on the fleet: tasks are named by job, round and node (e.g. 'fpld node 2 r0 JOB')."""
    from broker.auth import connect_checked

    if not broker:
        raise SettingsError("flower watches a fleet: pass --broker redis://... or set LMTEAM_BROKER_URL")
    connect_checked(broker)
    try:
        import flower as _  # noqa: F401
    except ImportError:
        raise click.ClickException("Flower is not installed: pip install 'lmteam[flower]'") from None
    os.environ["LMTEAM_BROKER_URL"] = broker
    from broker.app import app, configure

    configure(app, FleetSettings.from_env(broker_url=broker))
    app.start(["flower", f"--port={port}", f"--address={address}", f"--basic-auth={basic_auth}"])


def _register_commands() -> None:
    # Each job kind keeps its commands next to its code; the CLI only assembles them.
    from pipeline.fpld.cli import fpld
    from pipeline.models.cli import model
    from pipeline.rag.cli import rag
    from pipeline.report.cli import report
    from pipeline.smalltalk.cli import generate, smalltalk

    main.add_command(fpld)
    main.add_command(model)
    main.add_command(report)
    main.add_command(rag)
    main.add_command(smalltalk)
    main.add_command(generate)


_register_commands()

if __name__ == "__main__":
    main()
