"""`lmteam smalltalk train | eval` and `lmteam generate`: SmallTalk LM (arXiv 2410.03529) from the shell.

    lmteam smalltalk train --experts 4 --prefix 32 --corpus a.txt --corpus b.txt
    lmteam smalltalk eval runs/smalltalk-...            # held-out perplexity: routed mixture vs dense
    lmteam generate runs/smalltalk-... --prompt "To be, or not"     # routed to one expert's replicas
    lmteam smalltalk serve runs/smalltalk-... --replicas 2           # serve every expert until Ctrl-C

cli.py adds these (main.add_command(smalltalk); main.add_command(generate)).

This module must not import cli: workers run `python -m cli`, where cli.py is __main__, so
`from cli import ...` here would load cli.py a second time. Shared error handling lives in
pipeline/cli_errors.py for that reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from broker.settings import FleetSettings
from pipeline.cli_errors import broker_option, one_line_errors, secret_option, sigterm_unwinds


@click.group()
def smalltalk() -> None:
    """SmallTalk LM: an asynchronous mixture of experts routed by small prefix LMs.

    \b
    Routers are trained by hard EM (balanced assignment of sequences by their prefix loss), then
    every expert trains on its own cluster as an independent task with no communication. At
    inference the routers score a sequence's first M bytes and only the best expert runs.
    """


@smalltalk.command()
@click.option("--experts", "-e", default=4, show_default=True, help="Experts E (and routers).")
@click.option("--prefix", "-m", default=32, show_default=True, help="Routing prefix M in tokens (bytes for the built-in model; <= --block-size).")
@click.option("--corpus", "-c", multiple=True, type=click.Path(path_type=Path),
              help="Text file (or directory of .txt), one domain each; repeat. Default: built-in stdlib corpus.")
@click.option("--domain-bytes", default=0, show_default=True, help="Use at most this many bytes per domain (0: all).")
@click.option("--em-rounds", default=3, show_default=True, help="Router EM rounds T (fresh sequences each round).")
@click.option("--router-seqs", default=1024, show_default=True, help="Sequences assigned per EM round.")
@click.option("--router-steps", default=100, show_default=True, help="Router training steps per EM round.")
@click.option("--router-embd", default=16, show_default=True, help="Router width (1 layer by default).")
@click.option("--expert-steps", default=300, show_default=True, help="Training steps of each expert.")
@click.option("--checkpoint-every", default=50, show_default=True, help="Expert checkpoint interval (steps).")
@click.option("--dense/--no-dense", default=True, show_default=True,
              help="Also train the FLOPs-matched dense baseline (one expert's size).")
@click.option("--dense-match", type=click.Choice(["steps", "batch"]), default="steps", show_default=True,
              help="Dense gets E x the steps, or E x the batch (the paper's Table 2).")
@click.option("--block-size", default=128, show_default=True, help="Sequence length in tokens (bytes for the built-in model).")
@click.option("--n-layer", default=2, show_default=True)
@click.option("--n-embd", default=64, show_default=True)
@click.option("--n-head", default=4, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--eval-seqs", default=256, show_default=True, help="Held-out sequences (equal share per domain).")
@click.option("--model", default="", metavar="DIR|ALIAS|HUB_ID",
              help="Experts (and the dense model) fine-tune this HF causal LM, e.g. a folder from `lmteam model "
                   "init` or `smollm2`; routers stay small built-in models over its tokenizer. "
                   "Default: built-in byte-level experts sized by --n-layer/--n-embd.")
@click.option("--lora-rank", default=0, show_default=True, help="Experts train LoRA adapters of this rank (HF models).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run dir [default: runs/<job-id>].")
@click.option("--resume", "resume", type=click.Path(path_type=Path), default=None,
              help="Continue an interrupted run dir on this fleet; its config.json wins over the options above.")
@click.option("--threads", default=1, show_default=True, help="Torch threads per task of the embedded workers.")
@click.option("--workers", default=2, show_default=True,
              help="Expert workers of the embedded fleet: experts (and routers) train this many at a time.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@broker_option
@secret_option
@one_line_errors
def train(experts, prefix, corpus, domain_bytes, em_rounds, router_seqs, router_steps, router_embd, expert_steps,
          checkpoint_every, dense, dense_match, block_size, n_layer, n_embd, n_head, batch_size, eval_seqs, model,
          lora_rank, device, seed, out, resume, threads, workers, quiet, broker, secret) -> None:
    """Train routers (EM), experts (independent tasks) and the dense baseline; print the report.

    Runs on the embedded default (a private Redis and local workers) or, with --broker, on a fleet
    with `lmteam worker --role expert` and `--role aggregator` workers.

    The defaults are a demo of a few minutes: their experts are too undertrained for the mixture to win.
    This setting won in bench/smalltalk.py (-3.7%) on four distinct 480 KB texts, one per expert (10-15
    min on 2 cores); on Grimm and Shakespeare alone it lost (+7.0%): each expert needs text of its own.

    \b
      lmteam smalltalk train --corpus a.txt --corpus b.txt --corpus c.txt --corpus d.txt \\
        --n-layer 1 --n-head 2 --n-embd 32 --expert-steps 6000 --checkpoint-every 1000 \\
        --em-rounds 12 --router-seqs 1100 --router-steps 150 --eval-seqs 512
    """
    from broker.jobs import new_job_id
    from pipeline.smalltalk.config import KIND, SmallTalkConfig
    from pipeline.smalltalk.data import RunDir
    from pipeline.smalltalk.driver import run_smalltalk

    if resume is not None:
        _, cfg = RunDir(resume).load_config()
        out = resume
    else:
        cfg = SmallTalkConfig(experts=experts, prefix=prefix, corpus=[str(p) for p in corpus], domain_bytes=domain_bytes,
                              em_rounds=em_rounds, router_seqs=router_seqs, router_steps=router_steps,
                              router_embd=router_embd, router_head=2 if router_embd % 2 == 0 else 1,
                              expert_steps=expert_steps, checkpoint_every=checkpoint_every, dense=dense,
                              dense_match=dense_match, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                              n_head=n_head, batch_size=batch_size, eval_seqs=eval_seqs, model=model,
                              lora_rank=lora_rank, device=device, seed=seed).validate()
        from pipeline.models.lm import resolve_device

        resolve_device(device)  # the model itself is resolved (and hashed) once, by run_smalltalk
    settings = FleetSettings.from_env(broker_url=broker, secret=secret).validate()
    job_id = new_job_id(KIND)
    out = out or Path("runs") / job_id
    if resume is None and RunDir(out).exists():
        raise click.UsageError(f"{out} already holds a run: pass --resume {out} to continue it, or another --out")
    sigterm_unwinds()
    watch = _Bars(cfg) if not quiet else _no_bars
    say = click.echo if not quiet else _no_say
    short = _say_what_it_will_show(cfg, say) if cfg.dense and not cfg.model else None
    try:
        report = run_smalltalk(cfg, settings, out, say=say, watch=watch, threads=threads, job_id=job_id,
                               expert_workers=workers)
    finally:
        if isinstance(watch, _Bars):
            watch.close()
    print_report(report)
    _say_after(report, short)
    click.echo(f"run: {out}  (lmteam smalltalk eval {out}; lmteam generate {out} --prompt ...)")


@smalltalk.command(name="eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--prefix", "-m", type=int, default=None, help="Inference prefix M [default: the training prefix].")
@click.option("--corpus", "-c", multiple=True, type=click.Path(path_type=Path),
              help="Evaluate on these files instead of the run's held-out text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@one_line_errors
def eval_(run, prefix, corpus, as_json) -> None:
    """Held-out perplexity of a run's routed mixture vs its dense model (runs locally, no fleet needed)."""
    from pipeline.smalltalk.local import evaluate_run

    res = evaluate_run(run, prefix, [str(p) for p in corpus] or None)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmallTalk {res['job']}: {res['experts']} experts, inference prefix {res['prefix']}")
    for col in ("text", "sequences", "mixture ppl", "dense ppl", "routed to experts"):
        t.add_column(col, justify="right" if col != "text" else "left")
    for name, d in res["per_domain"].items():
        t.add_row(name, str(d["sequences"]), f"{d['ppl']:.3f}", _num(d.get("dense_ppl")), str(d["routed"]))
    t.add_row("all", str(res["sequences"]), f"{res['ppl']:.3f}", _num(res.get("dense_ppl")), str(res["load"]))
    t.add_row("all, after the prefix", "", f"{res['ppl_after_prefix']:.3f}", _num(res.get("dense_ppl_after_prefix")), "")
    Console().print(t)
    if res.get("dense_ppl") is not None:
        lo, hi = res["ppl_change_ci95"]
        click.echo(f"mixture vs dense: {100 * res['ppl_change']:+.2f}% "
                   f"(95% CI over these sequences {100 * lo:+.2f}% .. {100 * hi:+.2f}%)")


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Text to continue; its first M tokens pick the expert.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A file of prompts, one a line: routed and sent together, batched on the replicas.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per answer: text, expert, replica, times.")
@click.option("--max-new", default=200, show_default=True, help="Tokens to generate (bytes for built-in models).")
@click.option("--temperature", default=0.8, show_default=True, help="0 means greedy.")
@click.option("--top-k", default=40, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--local", is_flag=True, help="Load the routers and experts in this process instead (no fleet).")
@click.option("--replicas", default=1, show_default=True, help="Embedded fleet: replicas of each routed expert.")
@click.option("--fallback", is_flag=True,
              help="A prompt whose expert has no live replica goes to its next-best expert (recorded) "
                   "instead of failing.")
@click.option("--replica-timeout", default=10.0, show_default=True,
              help="Seconds an expert may have no live replica before its prompts fail (or fall back).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for every answer.")
@broker_option
@secret_option
@one_line_errors
def generate(run, prompt, prompts_file, as_json, max_new, temperature, top_k, seed, local, replicas, fallback,
             replica_timeout, timeout, broker, secret) -> None:
    """Sample text from a SmallTalk run: the routers pick one expert by the prompt's prefix, only it runs.

    The prompt is routed here and sent only to its expert's queue (expert.<I>), where the expert's
    replicas (`lmteam worker --role expert --serve RUN --expert I`) answer it: on the fleet of
    --broker, or on an embedded one started for this call. With --broker, RUN may also be the job
    id of a finished SmallTalk job in the fleet's store. --local runs everything in this process.

    RUN may also be an HF model folder, or an FPLD run whose student is one (`lmteam fpld --model
    ...` writes RUN/student/): then that model continues the prompt here (--max-new counts its tokens).
    """
    from pipeline.models.hf_folder import is_hf_folder

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give --prompt TEXT or --prompts FILE")
    prompts = [prompt] if prompt is not None else [x for x in prompts_file.read_text().splitlines() if x.strip()]
    if not prompts:
        raise click.UsageError(f"{prompts_file} holds no prompt")
    folder = run / "student" if is_hf_folder(run / "student") else run
    if is_hf_folder(folder):
        from pipeline.models.hf import generate_text

        for p in prompts:
            click.echo(p + generate_text(folder, p, max_new=max_new, temperature=temperature, top_k=top_k or None,
                                         seed=seed))
        return
    if local:
        from pipeline.smalltalk.local import generate as gen

        for p in prompts:
            res = gen(run, p, max_new, temperature, top_k or None, seed)
            losses = ", ".join(f"{x:.3f}" for x in res["router_losses"])
            if as_json:
                click.echo(json.dumps({"prompt": p, **res}))
                continue
            click.echo(f"[expert {res['expert']}; router losses on the first {res['prefix_bytes']} tokens: {losses}]",
                       err=True)
            click.echo(p + res["text"])
        return
    from pipeline.smalltalk.serve import Sampling
    from pipeline.smalltalk.serve_driver import generate as serve

    settings = FleetSettings.from_env(broker_url=broker, secret=secret).validate()
    sigterm_unwinds()
    answers = serve(run if broker else Path(run), prompts, Sampling(max_new, temperature, top_k or None, seed),
                    settings, replicas=replicas, fallback=fallback, replica_timeout=replica_timeout, timeout=timeout,
                    say=lambda text: click.echo(text, err=True))
    for a in answers:
        if as_json:
            click.echo(json.dumps(a))
            continue
        moved = f", fallback from expert {a['fallback_from']}" if a["fallback_from"] is not None else ""
        tag = (f"[expert {a['expert']}{moved}, replica {a['replica']}; router losses "
               f"{', '.join(f'{x:.3f}' for x in a['router_losses'])}; route {a['route_ms']:.0f} ms, "
               f"generation {a['gen_ms']:.0f} ms in a batch of {a['batch']}]")
        if len(answers) == 1:
            click.echo(tag, err=True)
            click.echo(a["prompt"] + a["text"])
        else:
            click.echo(f"{tag} {a['prompt']}{a['text']}")


@smalltalk.command()
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--replicas", default=1, show_default=True, help="Local replicas of every expert.")
@click.option("--threads", default=1, show_default=True, help="Torch threads per replica.")
@one_line_errors
def serve(run, replicas, threads) -> None:
    """Serve every expert of RUN on the embedded default until Ctrl-C: a private Redis, and N local
    replicas of each expert, each consuming its expert's queue expert.<I>.

    It prints the fleet's URL and secret: `lmteam generate RUN --broker URL --secret S --prompt ...`
    sends prompts to it. On a real fleet start the replicas yourself instead (README: serving).
    """
    import time

    from broker.registry import live_queues
    from broker.store import connect
    from pipeline.smalltalk.serve import run_from_dir
    from pipeline.smalltalk.serve_driver import serving_fleet

    served = run_from_dir(run)
    settings = FleetSettings.from_env(broker_url=None).validate()
    sigterm_unwinds()
    with serving_fleet(run, list(range(served.cfg.experts)), replicas, settings, threads) as fleet:
        s = fleet.settings
        click.echo(f"serving run {served.run_id}: {served.cfg.experts} experts x {replicas} replica(s)")
        click.echo(f"  lmteam generate {run} --broker '{s.broker_url}' --secret {s.secret} --prompt ...")
        client = connect(s.backend_url)
        while True:  # a replica that dies is reported; its requests fail over to the others
            time.sleep(5)
            up = {w["name"] for w in live_queues(client).values()}
            gone = sorted(set(fleet.procs) - up)
            if gone:
                click.echo(f"replicas not answering: {', '.join(gone)}", err=True)


def _say_what_it_will_show(cfg, say) -> float | None:
    """Before training: a newcomer must not read a losing mixture as the method failing. Returns the
    tokens per parameter when the run is too short for the mixture to win (None otherwise)."""
    from pipeline.smalltalk.steps import CAPACITY_BOUND_TOKENS_PER_PARAM, tokens_per_param

    tpp = tokens_per_param(cfg)
    if tpp >= CAPACITY_BOUND_TOKENS_PER_PARAM:
        return None
    say(f"note: this run shows how SmallTalk works (EM routers splitting the text, experts trained as "
        f"independent tasks, prefix routing), not that it wins. Expect the mixture's perplexity to be worse than "
        f"the dense model's: each expert trains on ~{tpp:.0f} tokens per parameter, and below ~"
        f"{CAPACITY_BOUND_TOKENS_PER_PARAM} the dense model of the same training FLOPs wins (more steps on one "
        "model beat specialising until it runs out of capacity; bench/smalltalk.py). The setting where it won, on "
        "four distinct texts (one per expert), is in `lmteam smalltalk train --help` (10-15 minutes on 2 cores).")
    return tpp


def _say_after(report: dict, short: float | None) -> None:
    s = report["summary"]
    if short is not None and s.get("ppl_change") is not None and s["ppl_change"] > 0:
        click.echo(f"As noted before training: at ~{short:.0f} tokens per parameter the dense model wins; this run "
                   "demonstrates the mechanics only (see `lmteam smalltalk train --help` for a winning setting).")


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s, cfg, fl = report["summary"], report["config"], report["flops"]
    t = Table(title=f"SmallTalk {report['job']}: {cfg['experts']} experts, prefix {cfg['prefix']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("mixture perplexity (held-out)", f"{s['mixture_ppl']:.3f}")
    if s.get("dense_ppl") is not None:
        t.add_row(f"dense perplexity ({cfg['dense_match']}-matched FLOPs)", f"{s['dense_ppl']:.3f}")
        ci = s.get("ppl_change_ci95")  # absent in reports written before it existed
        t.add_row("mixture vs dense", f"{100 * s['ppl_change']:+.2f}%" + (
            f" (95% CI over held-out sequences {100 * ci[0]:+.2f}% .. {100 * ci[1]:+.2f}%)" if ci else ""))
        t.add_row("after the prefix: mixture / dense",
                  f"{s['mixture_ppl_after_prefix']:.3f} / {s['dense_ppl_after_prefix']:.3f}")
    if s.get("mixture_ppl_per_byte") is not None and cfg.get("vocab_size", 256) != 256:
        t.add_row("per byte: mixture / dense", f"{s['mixture_ppl_per_byte']:.4f} / {_num(s.get('dense_ppl_per_byte'))}")
    t.add_row("oracle routing perplexity", f"{s['oracle_ppl']:.3f}")
    t.add_row("training FLOPs mixture / dense", f"{fl['train_flops_mixture']:.3e} / {fl['train_flops_dense']:.3e}")
    t.add_row("routing cost / one expert's inference", f"{100 * fl['routing_cost_fraction']:.2f}%")
    t.add_row("router size / expert size", f"{100 * fl['router_to_expert_params']:.2f}%")
    t.add_row("cluster purity", f"{s['purity']:.3f}")
    for c in report["clusters"]["clusters"]:
        t.add_row(f"cluster {c['expert']}", f"{c['size']} seqs, {c['dominant']} {100 * c['purity']:.0f}%")
    for name, task in report["tasks"].items():
        if int(task.get("attempts", 1) or 1) > 1 or int(task.get("resumed_from", 0) or 0):
            t.add_row(f"{name}: attempts / resumed from step", f"{task['attempts']} / {task.get('resumed_from', 0)}")
    t.add_row("wall time (s)", f"{report['wall_s']:.1f}")
    Console().print(t)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _no_bars(title: str, states: dict) -> None:
    pass


def _no_say(text: str) -> None:
    pass


class _Bars:
    """One progress bar per task of the current phase (routers, scoring shards, experts)."""

    def __init__(self, cfg) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.cfg = cfg
        self.bars = Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), console=Console(file=sys.stderr))
        self.title: str | None = None
        self.tasks: dict[str, int] = {}
        self.bars.start()

    def _total(self, name: str) -> int:
        if name.startswith("router"):
            return self.cfg.router_steps
        if name == "dense":
            return self.cfg.dense_steps
        return self.cfg.expert_steps if name.startswith("expert") else 1

    def __call__(self, title: str, states: dict[str, dict]) -> None:
        if title != self.title:
            for task_id in self.tasks.values():
                self.bars.remove_task(task_id)
            self.title = title
            self.tasks = {n: self.bars.add_task(f"{title} {n}", total=self._total(n), info="queued") for n in states}
        for name, s in states.items():
            status = str(s.get("status", "queued"))
            info = [status] + ([f"loss {float(s['loss']):.3f}"] if "loss" in s else [])
            if int(s.get("resumed_from", 0) or 0):
                info.append(f"resumed from {s['resumed_from']}")
            step = self._total(name) if status == "done" else int(s.get("step", 0) or 0)
            self.bars.update(self.tasks[name], completed=step, info=", ".join(info))

    def close(self) -> None:
        self.bars.stop()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def standalone() -> None:
    """SmallTalk LM commands, until cli.py adds them to `lmteam` (python -m pipeline.smalltalk.cli ...)."""


standalone.add_command(smalltalk)
standalone.add_command(generate)

if __name__ == "__main__":
    standalone()
