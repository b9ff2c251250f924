"""Serve a SmallTalk mixture on the fleet: route at the submitter, one expert's replicas generate.

    submitter:  routers score each prompt's prefix (pipeline/smalltalk/serve.py) -> expert I
                request stored under its id, queued for I, one doorbell task on queue expert.<I>
    replicas:   `lmteam worker --role expert --serve RUN --expert I` (workers/serve.py): the replica
                that takes a doorbell generates whatever is queued for I, up to LMTEAM_SERVE_BATCH
                prompts in one forward, and stores each answer once (SET NX, broker/serving.py)
    submitter:  waits on its wake list (broker/waiting.py); every LIVENESS_S it reads who claimed
                what, and a request claimed by a worker whose heartbeats stopped (broker/registry.py)
                is queued again for the same expert: another replica finishes it, and if the lost
                one was only slow its answer is dropped by SET NX, so no answer is delivered twice.
                An expert with no live replica for `replica_timeout` seconds fails the request with
                a clear error, or, with fallback, sends it to its next-best expert that has one.

Resending on a lost heartbeat, not Celery's redelivery, is what fails over: a SIGKILLed worker's
unacknowledged message only comes back after the visibility timeout (hours); when it does, its
doorbell finds nothing queued and does nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis

from broker import keys, serving
from broker.app import client_app
from broker.auth import check_fleet_secret, connect_checked
from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.jobs import JobFailed, JobRecord, UnknownJob
from broker.settings import FleetSettings
from broker.store import Store
from broker.waiting import seconds_left, wait_for
from pipeline.data import CorpusError
from pipeline.smalltalk.config import KIND, SmallTalkConfig
from pipeline.smalltalk.serve import (
    Sampling,
    ServedRun,
    encode_prompts,
    expert_order,
    route_prompts,
    run_from_dir,
)

LIVENESS_S = 0.5  # how often the submitter reads claims and heartbeats while it waits


class ServeFailed(JobFailed):
    """A request cannot be answered: no live replica of its expert, an error on the replica, a timeout."""


def open_served(run: str | Path, client: redis.Redis | None = None) -> ServedRun:
    """A run dir, or (with a client of the fleet's Redis) a finished SmallTalk job in its store."""
    if Path(run).exists() or client is None:
        return run_from_dir(Path(run))
    job_id = str(run)
    try:
        rec = JobRecord(client, job_id).get()
    except UnknownJob:
        raise CorpusError(f"{run} is neither a SmallTalk run dir nor a job in the fleet's store") from None
    if rec.get("kind") != KIND:
        raise ServeFailed(f"job {job_id} is a {rec.get('kind')} job, not a SmallTalk job")
    cfg = SmallTalkConfig.from_dict(JobRecord(client, job_id).config())
    st = Store(client)
    last = cfg.em_rounds - 1

    def blob(name: str) -> bytes:
        data = st.get_blob(job_id, name)
        if data is None:
            raise ServeFailed(f"job {job_id} has no {name} in the store (unfinished, or expired): serve its run dir")
        return data

    served = ServedRun(job_id, cfg, lambda e: blob(f"router/{last}/{e}"), lambda i: blob(f"expert/{i}/model"),
                       f"job {job_id}")
    blob(f"expert/{cfg.experts - 1}/model")  # a job without its experts fails here, not at the first request
    return served


class Mixture:
    """The submitter's side: routes prompts, sends them to the chosen experts' queues, waits, fails over."""

    def __init__(self, served: ServedRun) -> None:
        self.served = served
        self.tok = served.tokenizer()
        self.routers = served.routers()
        self.client = None
        self.app = None

    def route(self, prompts: list[str]) -> tuple[list[np.ndarray], np.ndarray, float]:
        """(token ids, (n, E) router losses, seconds it took) of the prompts."""
        ids = encode_prompts(self.tok, prompts)
        t0 = time.perf_counter()
        losses = route_prompts(self.routers, ids, self.served.cfg.prefix)
        return ids, losses, time.perf_counter() - t0

    def connect(self, settings: FleetSettings) -> Mixture:
        self.client = connect_checked(settings.backend_url)
        check_fleet_secret(self.client, settings.secret)
        self.app = client_app(settings)
        return self

    def close(self) -> None:
        if self.app is not None:
            self.app.close()

    def submit(self, prompts: list[str], sampling: Sampling, routed: tuple | None = None) -> Submission:
        """Route (unless `routed` is given) and send every prompt to its expert's queue only."""
        ids, losses, route_s = routed or self.route(prompts)
        sub = Submission(uuid.uuid4().hex[:12], prompts, losses, route_s)
        body = {"run": self.served.run_id, "submission": sub.id, "max_new": sampling.max_new,
                "temperature": sampling.temperature, "top_k": sampling.top_k or 0, "seed": sampling.seed}
        requests = {}
        for i, rid in enumerate(sub.rids):
            requests[rid] = {**body, "expert": sub.expert[rid], "ids": ids[i].astype("<i4").tobytes(),
                             "seed": sampling.seed + i, "sent_at": time.time()}
        serving.put_requests(self.client, requests)  # before the doorbells: a doorbell finds its request
        sub.sent_at = time.monotonic()
        for rid in sub.rids:
            self._ring(sub.expert[rid], rid)
        return sub

    def _ring(self, expert: int, rid: str) -> None:
        self.app.send_task(keys.SERVE_TASK, args=[expert, rid], shadow=f"serve expert {expert} {rid}")

    def wait(self, sub: Submission, timeout: float | None = 600.0, replica_timeout: float = 10.0,
             fallback: bool = False, strict: bool = True) -> list[dict]:
        """One answer per prompt, in order. `strict`: raise ServeFailed on a missing or failed answer;
        else a missing one is None (the bench counts them)."""
        c = self.client
        state = {"checked": 0.0}
        no_live_since: dict[int, float] = {}

        def check() -> bool | None:
            open_ = sub.outstanding()
            for rid, ans in serving.answers(c, open_).items():
                sub.got(rid, ans)
            open_ = sub.outstanding()
            if not open_:
                return True
            now = time.monotonic()
            if now - state["checked"] >= LIVENESS_S:
                state["checked"] = now
                self._failover(sub, open_, no_live_since, replica_timeout, fallback)
            return None

        done = wait_for(check, seconds_left(timeout), client=c, wake=keys.serve_wake(sub.id))
        if done is None and strict:
            missing = sub.outstanding()
            raise ServeFailed(f"{len(missing)} of {len(sub.rids)} answers missing after {timeout:.0f}s "
                              f"(experts {sorted({sub.expert[r] for r in missing})})")
        results = sub.results()
        failed = [r for r in results if r and r.get("error")]
        if failed and strict:
            raise ServeFailed(f"expert {failed[0]['expert']} ({failed[0].get('replica')}): {failed[0]['error']}")
        return results

    def _failover(self, sub: Submission, open_: list[str], no_live_since: dict[int, float], replica_timeout: float,
                  fallback: bool) -> None:
        live = serving.replicas(self.client)
        hosts = {h for reps in live.values() for h in reps}
        for rid, host in serving.claims(self.client, open_).items():
            if host not in hosts:  # claimed by a worker that stopped beating: redo it elsewhere
                serving.requeue(self.client, rid, sub.expert[rid])
                sub.resent[rid] = sub.resent.get(rid, 0) + 1
                self._ring(sub.expert[rid], rid)
        now = time.monotonic()
        for e in sorted({sub.expert[r] for r in open_}):
            if live.get(e):
                no_live_since.pop(e, None)
                continue
            if now - no_live_since.setdefault(e, now) < replica_timeout:
                continue
            stuck = [r for r in open_ if sub.expert[r] == e]
            if not fallback:
                raise ServeFailed(f"expert {e} has no live replica: no live worker has consumed queue "
                                  f"{keys.expert_queue(e)} for {replica_timeout:.0f}s ({len(stuck)} request(s) "
                                  f"waiting). Start one with `lmteam worker --role expert --serve RUN --expert "
                                  f"{e}`, or pass --fallback to use the next-best expert")
            for rid in stuck:
                nxt = next((int(x) for x in sub.order[rid] if live.get(int(x)) and int(x) not in sub.tried[rid]), None)
                if nxt is None:
                    raise ServeFailed(f"no expert with a live replica is left for a prompt routed to expert "
                                      f"{sub.routed[rid]} (tried {sorted(sub.tried[rid])})")
                serving.requeue(self.client, rid, nxt, was=e)
                sub.move(rid, nxt)
                self._ring(nxt, rid)


class Submission:
    """The requests of one call: their experts, answers as they arrive, resends and fallbacks."""

    def __init__(self, sid: str, prompts: list[str], losses: np.ndarray, route_s: float) -> None:
        self.id, self.prompts, self.losses, self.route_s = sid, prompts, losses, route_s
        self.rids = [f"{sid}-{i}" for i in range(len(prompts))]
        order = expert_order(losses)
        self.order = {rid: order[i] for i, rid in enumerate(self.rids)}
        self.routed = {rid: int(order[i, 0]) for i, rid in enumerate(self.rids)}
        self.expert = dict(self.routed)
        self.tried = {rid: {e} for rid, e in self.routed.items()}
        self.fallback_from: dict[str, int] = {}
        self.resent: dict[str, int] = {}
        self.answers: dict[str, dict] = {}
        self.seen: dict[str, float] = {}
        self.sent_at = time.monotonic()

    def outstanding(self) -> list[str]:
        return [r for r in self.rids if r not in self.answers]

    def got(self, rid: str, answer: dict) -> None:
        self.answers[rid] = answer
        self.seen[rid] = time.monotonic()

    def move(self, rid: str, expert: int) -> None:
        self.fallback_from.setdefault(rid, self.routed[rid])
        self.expert[rid] = expert
        self.tried[rid].add(expert)

    def results(self) -> list[dict | None]:
        out: list[dict | None] = []
        for i, rid in enumerate(self.rids):
            a = self.answers.get(rid)
            if a is None:
                out.append(None)
                continue
            out.append({
                "prompt": self.prompts[i], "text": a.get("text", ""), "expert": a.get("expert"),
                "replica": a.get("replica"), "host": a.get("host"), "routed_expert": self.routed[rid],
                "fallback_from": self.fallback_from.get(rid), "router_losses": [float(x) for x in self.losses[i]],
                "route_ms": 1000 * self.route_s, "queue_ms": a.get("queue_ms"), "gen_ms": a.get("gen_ms"),
                "total_ms": 1000 * (self.seen[rid] - self.sent_at), "batch": a.get("batch"),
                "resent": self.resent.get(rid, 0), "request": rid, **({"error": a["error"]} if a.get("error") else {}),
            })
        return out


def replica_specs(run: Path, experts: list[int], replicas: int, threads: int = 1) -> list[WorkerSpec]:
    """Local replica processes: expert<I>-r<k> consumes queue expert.<I>."""
    return [WorkerSpec("expert", threads=threads, worker_name=f"expert{e}-r{k}", serve=str(Path(run).resolve()),
                       expert=e) for e in experts for k in range(replicas)]


@contextmanager
def serving_fleet(run: Path, experts: list[int], replicas: int, settings: FleetSettings, threads: int = 1,
                  workdir: Path | None = None) -> Iterator[EmbeddedFleet]:
    """An embedded fleet (private Redis) with `replicas` local replicas of each of `experts`."""
    with EmbeddedFleet(replica_specs(run, experts, replicas, threads), settings, workdir=workdir) as fleet:
        fleet.wait_ready(connect_checked(fleet.settings.backend_url))
        yield fleet


def generate(run: str | Path, prompts: list[str], sampling: Sampling, settings: FleetSettings, *,
             replicas: int = 1, fallback: bool = False, replica_timeout: float = 10.0, timeout: float = 600.0,
             say: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Answer the prompts on the fleet of `settings`, or on an embedded one with `replicas` replicas of
    each expert the prompts were routed to (none of the others: their replicas would sit idle)."""
    if settings.broker_url is not None:
        client = connect_checked(settings.backend_url)
        mix = Mixture(open_served(run, client)).connect(settings)
        try:
            return mix.wait(mix.submit(prompts, sampling), timeout, replica_timeout, fallback)
        finally:
            mix.close()
    mix = Mixture(run_from_dir(Path(run)))
    routed = mix.route(prompts)
    experts = sorted({int(e) for e in routed[1].argmin(axis=1)})
    say(f"starting an embedded fleet: private redis-server, {replicas} replica(s) of expert(s) "
        f"{', '.join(map(str, experts))}")
    with serving_fleet(Path(run), experts, replicas, settings) as fleet:
        mix.connect(fleet.settings)
        try:
            return mix.wait(mix.submit(prompts, sampling, routed), timeout, replica_timeout, fallback)
        finally:
            mix.close()
