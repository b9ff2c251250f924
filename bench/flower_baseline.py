"""Flower baseline for bench/fleet_scale.py: what one FL round costs in Flower (flwr 1.42) at K nodes.

The same work as our fleet's rounds, with trivial compute: K ClientApps each return one array of the
payload's shape (a fixed random array plus the round number, so nothing is cached) and the ServerApp
averages them with Flower's own FedAvg (`flwr.serverapp.strategy.FedAvg`, every node weighted 1, no
federated evaluation). The server sends each node a 1-value ArrayRecord and a config (shape, dtype),
like our small student broadcast; the payload goes node -> server. A payload is a shape (float32) or a
(shape, dtype) pair, e.g. {"dense-1MB-u8": ((4096, 256), "uint8")}; FedAvg's mean is float64 either way.

Per round (timed in the ServerApp by a FedAvg subclass): configure_train -> aggregate_train done, i.e.
node sampling, sending, the ClientApps, receiving and the mean. round_overhead_s = median over rounds
2..N of (round time - the slowest node's measured compute), the compute being array creation only
(measured 0.03-1.2 s on the loaded machine: a fresh flwr-clientapp process draws its random base;
serialising the array into an ArrayRecord counts as overhead). aggregator_peak_rss_mb is VmHWM
of the process running the ServerApp (simulation: the driver process, which also runs the Ray
driver; deployment: the flwr-serverapp process). fleet_pss_mb sums PSS (smaps_rollup) of every
process of the run (the driver and its Ray processes; or SuperLink, SuperNodes and their children),
read by the ServerApp after the last round. payload_bytes = the serialised Array bytes of one reply.

Engines: "flwr-simulation" = run_simulation with the Ray backend, in a subprocess per (K, payload),
Ray with os.cpu_count() CPUs and up to MAX_ACTORS client actors; "flwr-deployment" = flower-superlink
--insecure + K flower-supernode --insecure (ClientApps in subprocess isolation, the default) + `flwr run`
of a generated app dir, all on free loopback ports, all killed at the end; K > DEPLOY_MAX_NODES (16)
gives a row with only a note (K = 64 does not fit the shared 2-core machine). Deployment round times
are dominated by flwr's fixed polls (3 s) and one flwr-clientapp process start per node per round.
Rows also carry run_wall_s, round_s_all, node_compute_s_max, fleet_processes and, where needed, a note.

    python bench/flower_baseline.py --nodes 4 16 64 --rows 4096   # 1 MB uint8 payload; bench/results/flower_baseline.json
    python bench/flower_baseline.py --nodes 4 --dtype uint8 float32 --no-deployment
    FLOWER_BENCH_LOGDIR=/tmp/logs python bench/flower_baseline.py ...   # keep each run's log

From Python (bench/ on sys.path): flower_rows([4, 16], {"dense-1MB": ((4096, 256), "uint8")}).
Needs flwr[simulation] (bench only; the product never imports flwr). Measured 2026-12-03 on the shared
2-core machine: simulation K = 4/16/64 took 25/40/98 s, deployment K = 4/16 took 164/405 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC_ENV = "FLOWER_BENCH_SPEC"  # JSON: nodes, shape, dtype, rounds, out, roots_file
MAX_ACTORS = 8  # Ray client actors in simulation (fewer when K is smaller)
RUN_TIMEOUT_S = 900
DEPLOY_MAX_NODES = 16  # K above this: a deployment row with DEPLOY_SKIP_NOTE only
DEPLOY_SKIP_NOTE = ("not run: every round starts a flwr-clientapp process per node, so its time and memory grow with "
                    "K (the K = 16 row of the same run says how much); on the shared 2-core machine K = 64 "
                    "extrapolates to about 20 min and over 12 GB PSS. Raise DEPLOY_MAX_NODES to run it on a bigger "
                    "machine")
DEPLOYMENT_NOTE = ("flwr 1.42 defaults: the ServerApp's grid pulls replies every 3 s and each SuperNode pulls "
                   "messages every 3 s (both hard-coded), its SuperExec polls every 1 s and starts a flwr-clientapp "
                   "process per message (subprocess isolation, the default)")


def build_apps():
    """(server_app, client_app) of the bench; the spec comes from the environment (SPEC_ENV)."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app, server_app, base = ClientApp(), ServerApp(), {}

    @client_app.train()
    def train(msg, context):
        t0 = time.perf_counter()
        cfg = msg.content["config"]
        shape, dtype = tuple(int(s) for s in str(cfg["shape"]).split("x")), np.dtype(str(cfg["dtype"]))
        if (shape, dtype) not in base:
            rng = np.random.default_rng(0)
            base[shape, dtype] = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8
                                  else rng.standard_normal(shape, dtype=np.float32).astype(dtype))
        arr = base[shape, dtype] + np.asarray(int(cfg["server-round"]), dtype=dtype)
        compute = time.perf_counter() - t0
        return Message(RecordDict({"arrays": ArrayRecord([arr]),
                                   "metrics": MetricRecord({"num-examples": 1, "t_compute": compute})}),
                       reply_to=msg)

    class TimedFedAvg(FedAvg):
        def __init__(self, spec: dict, **kw):
            super().__init__(**kw)
            self.spec, self.round_s, self.compute_s, self.replies, self.payload_bytes = spec, [], [], [], 0
            self.tiny = ArrayRecord([np.zeros(1, np.float32)])

        def configure_train(self, server_round, arrays, config, grid):
            self.t0 = time.perf_counter()
            config["shape"] = "x".join(str(s) for s in self.spec["shape"])
            config["dtype"] = self.spec["dtype"]
            return super().configure_train(server_round, self.tiny, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            self.round_s.append(time.perf_counter() - self.t0)
            ok = [m for m in replies if not m.has_error()]
            self.replies.append(len(ok))
            self.compute_s.append(max((float(m.content["metrics"]["t_compute"]) for m in ok), default=0.0))
            if ok:
                rec = next(iter(ok[0].content.array_records.values()))
                self.payload_bytes = sum(len(a.data) for a in rec.values())
            return out

    @server_app.main()
    def main(grid, context):
        spec = json.loads(os.environ[SPEC_ENV])
        k = spec["nodes"]
        strategy = TimedFedAvg(spec, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k)
        strategy.start(grid=grid, initial_arrays=strategy.tiny, num_rounds=spec["rounds"])
        roots = [os.getpid()]
        if spec.get("roots_file"):
            roots += [int(p) for p in Path(spec["roots_file"]).read_text().split()]
        from fleet_procs import pss_mb, status_kb, tree  # beside this file, also in Flower's app folder

        result = {"round_s": strategy.round_s, "compute_s": strategy.compute_s, "replies": strategy.replies,
                  "payload_bytes": strategy.payload_bytes, "peak_rss_mb": status_kb("self", "VmHWM") / 1024,
                  "fleet_pss_mb": pss_mb(*roots), "fleet_processes": len(tree(*roots))}
        Path(spec["out"]).write_text(json.dumps(result))

    return server_app, client_app


def _simulate() -> None:
    """Entry of the per-run subprocess: run_simulation with the Ray backend."""
    from flwr.simulation import run_simulation

    spec = json.loads(os.environ[SPEC_ENV])
    server_app, client_app = build_apps()
    cpus = os.cpu_count() or 1
    actors = min(spec["nodes"], MAX_ACTORS)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=spec["nodes"],
                   backend_config={"client_resources": {"num_cpus": cpus / actors, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "logging_level": "ERROR"}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APP_PYPROJECT = """[project]
name = "flowerbench"
version = "1.0.0"
description = "lmteam Flower baseline"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "lmteam"

[tool.flwr.app.components]
serverapp = "bench_app:server_app"
clientapp = "bench_app:client_app"
"""


def _deploy(spec: dict, work: Path, env: dict, log) -> str | None:
    """One deployment-engine run on loopback; returns a note, or None. The ServerApp writes spec['out']."""
    app = work / "app"
    app.mkdir()
    shutil.copy(__file__, app / "flower_baseline.py")
    shutil.copy(Path(__file__).with_name("fleet_procs.py"), app / "fleet_procs.py")
    (app / "bench_app.py").write_text("from flower_baseline import build_apps\n\napps = build_apps()\n"
                                      "server_app = apps[0]\nclient_app = apps[1]\n")  # Flower checks by AST
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    port = _free_port()
    home = work / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = dict(env, FLWR_HOME=str(home))
    procs: list[subprocess.Popen] = []

    def start(cmd):
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=work))

    try:
        start(["flower-superlink", "--insecure", "--port", str(port), "--disable-runtime-dependency-installation"])
        time.sleep(3)
        for _ in range(spec["nodes"]):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(_free_port())])
        Path(spec["roots_file"]).write_text("\n".join(str(p.pid) for p in procs))
        subprocess.run(["flwr", "run", str(app), "bench"], env=env, stdout=log, stderr=subprocess.STDOUT,
                       cwd=work, timeout=120, check=True)
        deadline = time.time() + RUN_TIMEOUT_S
        while not Path(spec["out"]).exists():
            if time.time() > deadline:
                return f"no result within {RUN_TIMEOUT_S}s"
            if procs[0].poll() is not None:
                return f"superlink exited ({procs[0].returncode})"
            time.sleep(0.5)
        return None
    finally:
        for p in procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=5)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def _empty_row(system: str, k: int, label: str, shape: tuple[int, ...], dtype: str) -> dict:
    return {"system": system, "nodes": k, "payload": label, "payload_values_per_node": math.prod(shape),
            "payload_dtype": dtype, "payload_bytes": None, "round_overhead_s": None, "round_overhead_s_all": [],
            "aggregator_peak_rss_mb": None, "redis_peak_mb": None, "fleet_pss_mb": None, "rounds_counted": 0,
            "run_wall_s": None}


def _one(system: str, k: int, label: str, shape: tuple[int, ...], dtype: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="flower_bench_") as tmp:
        work = Path(tmp)
        spec = {"nodes": k, "shape": list(shape), "dtype": dtype, "rounds": rounds, "out": str(work / "out.json"),
                "roots_file": str(work / "roots") if system == "flwr-deployment" else None}
        env = dict(os.environ, **{SPEC_ENV: json.dumps(spec)}, RAY_DEDUP_LOGS="0")
        note, t0 = None, time.time()
        with open(work / "log.txt", "w") as log:
            try:
                if system == "flwr-simulation":
                    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_simulate"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=True)
                else:
                    note = _deploy(spec, work, env, log)
            except (subprocess.SubprocessError, OSError) as e:
                note = f"{type(e).__name__}: {e}"
        wall = time.time() - t0
        if os.environ.get("FLOWER_BENCH_LOGDIR"):  # keep the run's log
            shutil.copy(work / "log.txt", Path(os.environ["FLOWER_BENCH_LOGDIR"]) / f"{system}-{k}-{label}.log")
        row = _empty_row(system, k, label, shape, dtype)
        row["run_wall_s"] = round(wall, 1)
        if not Path(spec["out"]).exists():
            tail = (work / "log.txt").read_text(errors="replace")[-1500:]
            row["note"] = f"{note or 'no result'}; log tail: {tail}"
            return row
        res = json.loads(Path(spec["out"]).read_text())
    over = [r - c for r, c in zip(res["round_s"], res["compute_s"], strict=True)][1:]
    row.update(payload_bytes=res["payload_bytes"], round_overhead_s=statistics.median(over) if over else None,
               round_overhead_s_all=over, round_s_all=res["round_s"], node_compute_s_max=max(res["compute_s"]),
               aggregator_peak_rss_mb=round(res["peak_rss_mb"], 1), fleet_pss_mb=round(res["fleet_pss_mb"], 1),
               fleet_processes=res["fleet_processes"], rounds_counted=len(over))
    notes = [f"replies per round {res['replies']} < K"] if min(res["replies"]) < k else []
    if system == "flwr-deployment":
        notes.append(DEPLOYMENT_NOTE)
    if notes:
        row["note"] = "; ".join(notes)
    return row


def flower_rows(nodes: list[int], payloads: dict[str, tuple[int, ...]], rounds: int = 10,
                deployment: bool = True) -> list[dict]:
    """Rows for fleet_scale.py: per K and payload, Flower's simulation engine (and deployment engine).
    A payload is a shape (float32) or (shape, dtype), e.g. ((4096, 256), "uint8")."""
    systems = ["flwr-simulation"] + (["flwr-deployment"] if deployment else [])
    rows = []
    for k in nodes:
        for label, p in payloads.items():
            shape, dtype = (tuple(p[0]), str(p[1])) if isinstance(p[0], (tuple, list)) else (tuple(p), "float32")
            for system in systems:
                if system == "flwr-deployment" and k > DEPLOY_MAX_NODES:
                    rows.append(dict(_empty_row(system, k, label, shape, dtype), note=DEPLOY_SKIP_NOTE))
                else:
                    rows.append(_one(system, k, label, shape, dtype, rounds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--_simulate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096], help="payload rows (x 256 values)")
    ap.add_argument("--dtype", nargs="+", default=["uint8"], help="payload dtypes (uint8 = our 8-bit payload)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-deployment", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "flower_baseline.json")
    args = ap.parse_args()
    if args._simulate:
        return _simulate()
    import flwr

    payloads = {f"{r}x256-{d}": ((r, 256), d) for r in args.rows for d in args.dtype}  # 4096x256-uint8: 1 MB
    rows = flower_rows(args.nodes, payloads, args.rounds, deployment=not args.no_deployment)
    print(f"{'system':16} {'K':>3} {'payload':>14} {'bytes':>10} {'overhead_s':>10} {'peak_rss_mb':>11} "
          f"{'fleet_pss_mb':>12} {'wall_s':>7}")
    for r in rows:
        print(f"{r['system']:16} {r['nodes']:3d} {r['payload']:>14} {r['payload_bytes'] or 0:>10,} "
              f"{r['round_overhead_s'] or float('nan'):10.3f} {r['aggregator_peak_rss_mb'] or float('nan'):11.1f} "
              f"{r['fleet_pss_mb'] or float('nan'):12.1f} {r['run_wall_s']:7.1f}" + (f"  {r['note'][:200]}" if "note" in r else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "flwr_version": flwr.__version__,
                                    "machine": f"{platform.node()}: {os.cpu_count()} CPUs, "
                                               f"{platform.platform()}, loopback, shared"}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
