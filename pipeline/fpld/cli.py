"""`lmteam fpld`: federated probe-logit distillation from the shell (cli.py adds the command)."""

from __future__ import annotations

from pathlib import Path

import click

from broker.settings import FleetSettings
from pipeline.cli_errors import broker_option, one_line_errors, secret_option, sigterm_unwinds


@click.command()
@click.option("--nodes", "-k", default=4, show_default=True, help="Federated nodes K (one private shard each).")
@click.option("--rounds", "-t", default=3, show_default=True, help="Communication rounds T.")
@click.option("--bits", "-b", default=8, show_default=True,
              help="Bits per logit coordinate on the wire: 1..16, or 32 for raw float32.")
@click.option("--clip", default=20.0, show_default=True, help="Logits are clipped to [-clip, clip] before quantizing.")
@click.option("--dither/--no-dither", default=True, show_default=True, help="Subtractive dither in the quantizer.")
@click.option("--compress/--no-compress", default=False, show_default=True, help="zstd on top of bit-packing.")
@click.option("--quorum", type=int, default=None, help="Nodes that must merge per round [default: 3/4 of nodes].")
@click.option("--merge-groups", default=0, show_default=True,
              help="Two-level merge: group aggregators fold runs of nodes into partial sums, a root adds them. "
                   "1: one aggregator folds every payload; 0: about sqrt(nodes) groups from 128 nodes when "
                   "2+ aggregator workers are up, else 1.")
@click.option("--round-timeout", default=600.0, show_default=True,
              help="Seconds until a round's deadline; later payloads are dropped.")
@click.option("--corpus", "-c", multiple=True, type=click.Path(path_type=Path),
              help="Text file (or directory of .txt) per domain; repeat. Default: built-in stdlib corpus. "
                   "Embedded runs give each node one domain; on a fleet it supplies the public probe/eval text.")
@click.option("--local-steps", default=150, show_default=True, help="Local fine-tuning steps per node per round.")
@click.option("--distill-steps", default=150, show_default=True, help="Distillation steps per round.")
@click.option("--probe-seqs", default=64, show_default=True, help="Public probe sequences (logits at every position).")
@click.option("--eval-seqs", default=64, show_default=True, help="Held-out sequences for perplexity.")
@click.option("--method", type=click.Choice(["fpld", "fedavg"]), default="fpld", show_default=True,
              help="fpld: nodes send probe logits, the aggregator distills; fedavg: the baseline, nodes send "
                   "their weights (or LoRA adapters) and the student is their mean.")
@click.option("--payload", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True,
              help="dense: every logit at --bits; sparse: the top --topk log-probs per position at --bits, the "
                   "tail rebuilt from the broadcast student (for real vocabularies).")
@click.option("--topk", default=128, show_default=True, help="Tokens per position in a sparse payload.")
@click.option("--model", "-m", default="", metavar="DIR|ALIAS|HUB_ID",
              help="An HF causal LM: a local folder (see `lmteam model init`), `smollm2` once pulled "
                   "(`lmteam model pull smollm2`), or a hub id where you have network. "
                   "Default: the built-in byte-level GPT sized by --n-layer/--n-embd.")
@click.option("--lora-rank", default=0, show_default=True,
              help="Fine-tune and distill LoRA adapters of this rank (HF models); only adapters travel. 0: all weights.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available), cpu, cuda, cuda:N or mps; a worker's own --device wins.")
@click.option("--block-size", default=64, show_default=True, help="Tokens per training/probe window.")
@click.option("--n-layer", default=2, show_default=True, help="Built-in model: transformer blocks.")
@click.option("--n-embd", default=128, show_default=True, help="Built-in model: width.")
@click.option("--n-head", default=4, show_default=True, help="Built-in model: attention heads.")
@click.option("--batch-size", default=16, show_default=True, help="Windows per training and distillation step.")
@click.option("--lr", default=3e-3, show_default=True, help="Local fine-tuning learning rate.")
@click.option("--distill-lr", default=3e-3, show_default=True, help="Distillation learning rate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--measure-teacher-kl", is_flag=True,
              help="Nodes also upload float32 probe logits (4x an 8-bit payload) so the report gives "
                   "KL(full-precision teacher || B-bit teacher); those bytes are reported beside the uplink.")
@click.option("--fault", multiple=True, metavar="NODE=SPEC",
              help="Inject a fault, e.g. 2=slow:30 or 3=raise:1 (see broker/faults.py). For drills.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for report.json and the student checkpoint [default: runs/<job-id>].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@broker_option
@secret_option
@one_line_errors
def fpld(nodes, rounds, bits, clip, dither, compress, quorum, merge_groups, round_timeout, corpus, local_steps, distill_steps,
         probe_seqs, eval_seqs, method, payload, topk, model, lora_rank, device, block_size, n_layer, n_embd, n_head,
         batch_size, lr, distill_lr, seed, measure_teacher_kl, fault, out, quiet, broker, secret) -> None:
    """Federated probe-logit distillation (arXiv 2605.09986).

    K nodes fine-tune the broadcast student on their private text, send B-bit quantized logits
    on a public probe set, and the aggregator distills the next student from their mean.
    Prints a summary table and writes a JSON report.

    \b
    A real model, LoRA adapters, sparse payloads at its full vocabulary:
      lmteam model pull smollm2
      lmteam fpld --model smollm2 --lora-rank 8 --payload sparse --topk 128 --block-size 128
    The FedAvg baseline on the same fleet: lmteam fpld --method fedavg ...
    """
    from broker.jobs import new_job_id
    from pipeline.fpld.config import FPLDConfig
    from pipeline.fpld.driver import run_fpld
    from pipeline.fpld.summary import print_fpld_summary
    from pipeline.job_config import ConfigError
    from pipeline.report.progress import NullProgress, RichProgress

    faults = {}
    for item in fault:
        node, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(f"--fault takes NODE=SPEC, got {item!r}")
        faults[node.strip()] = spec.strip()
    cfg = FPLDConfig(nodes=nodes, rounds=rounds, bits=bits, clip=clip, dither=dither, compress=compress,
                     quorum=quorum, merge_groups=merge_groups, round_timeout=round_timeout, corpus=[str(p) for p in corpus],
                     local_steps=local_steps, distill_steps=distill_steps, probe_seqs=probe_seqs,
                     eval_seqs=eval_seqs, seed=seed, measure_teacher_kl=measure_teacher_kl, method=method,
                     payload=payload, topk=topk, model=model, lora_rank=lora_rank, device=device,
                     block_size=block_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, batch_size=batch_size,
                     lr=lr, distill_lr=distill_lr, faults=faults).validate()
    from pipeline.models.lm import resolve_device

    resolve_device(device)  # a bad --device fails here, in one line, before anything starts
    settings = FleetSettings.from_env(broker_url=broker, secret=secret).validate()
    from pipeline.data import load_corpus

    load_corpus(cfg.corpus) if cfg.corpus else None  # fail on bad files before anything starts
    progress = NullProgress() if quiet else RichProgress()
    # SIGTERM unwinds like Ctrl-C, so the embedded fleet is torn down either way.
    sigterm_unwinds()
    job_id = new_job_id("fpld")
    out = out or Path("runs") / job_id
    report = run_fpld(cfg, settings, out_dir=out, progress=progress, job_id=job_id)
    print_fpld_summary(report)
    click.echo(f"report: {out / 'report.json'}")
