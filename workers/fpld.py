"""FPLD's Celery tasks: a node's round and the aggregator's round, thin over pipeline/fpld/steps.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache

from broker import keys
from broker.app import app, settings_of
from broker.faults import Fault, parse_faults
from broker.jobs import JobRecord, NodeStatus
from broker.round_gate import (
    MERGE_THREADS,
    Seal,
    classify_nodes,
    group_results,
    merge_groups,
    quorum_error,
    round_groups,
)
from broker.store import Store
from broker.wire.codec import PayloadError, encode_logits
from pipeline.fpld.config import FPLDConfig
from workers.base import (
    FleetTask,
    blob,
    device_for,
    group_merge_round,
    merge_round,
    private_ids,
    secret,
    state_dir,
    store,
)


@cache
def job_config(job_id: str) -> FPLDConfig:
    """A job's config never changes, so it is read once per worker process."""
    return FPLDConfig.from_dict(JobRecord(store().r, job_id).config())


@lru_cache(maxsize=4)
def public_windows(job_id: str, name: str):
    """A job's probe or eval set never changes: fetched and decoded once per worker process, not
    once per round (at K = 64 that was 64 MB of reads a round for the probe set alone)."""
    from pipeline.data import windows_from_bytes

    return windows_from_bytes(blob(store(), job_id, name), job_config(job_id).block_size)


def fault_of(job_id: str, rnd: int, node: str) -> Fault | None:
    fault = parse_faults(job_config(job_id).faults).get(node)
    return fault if fault and fault.fires(rnd) else None


@app.task(bind=True, base=FleetTask, name=keys.FPLD_NODE_TASK, node_task=True,
          fault_of=staticmethod(fault_of))
def fpld_node_round(self, job_id: str, rnd: int, node: str) -> dict:
    """Fine-tune on private data, send quantized probe logits. Returns a small receipt."""
    from pipeline.fpld.steps import node_round

    run = self.begin(job_id, rnd, node, skip_if_sealed=True,
                     done=lambda st: st.get_payload(job_id, rnd, node) is not None)
    if run is None:
        return {"node": node, "round": rnd, "status": "skipped"}
    cfg = job_config(job_id)
    ckpt_path = state_dir() / "checkpoints" / f"{job_id}-r{rnd}-n{node}.safetensors"
    out = node_round(cfg, job=job_id, rnd=rnd, node=node, student=run.blob(f"student/{rnd}"),
                     private=private_ids(cfg.model_spec()), probe=public_windows(job_id, "probe"),
                     eval_windows=public_windows(job_id, "eval"),
                     secret=secret(), progress=run.progress, checkpoint=ckpt_path, device=device_for(cfg.device))
    ckpt_path.unlink(missing_ok=True)
    if out.full_logits is not None:  # --measure-teacher-kl: the float32 side channel, counted apart
        diag = encode_logits(out.full_logits, secret=secret(), job=job_id, round=rnd, node=node, bits=32)
        run.st.put_blob(job_id, f"diag/{rnd}/{node}", diag)
        out.metrics["teacher_kl_bytes"] = len(diag)
    outcome = run.submit(out.payload)
    run.finish(**out.metrics)
    return {"node": node, "round": rnd, "status": outcome, "bytes": len(out.payload)}


@app.task(bind=True, name=keys.FPLD_AGGREGATE_TASK)
def fpld_aggregate_round(self, job_id: str, rnd: int, deadline: float) -> dict:
    """Once every node is in or the deadline has passed: seal the round, merge what arrived, distill.
    In a two-level round: once every group is written, add the groups' partial sums instead."""
    st = store()
    cfg = job_config(job_id)
    nodes, groups = cfg.node_ids, round_groups(st, job_id, rnd)
    side = tuple(f"diag/{rnd}/{n}" for n in nodes) + (tuple(f"partial/{rnd}/{g}" for g in range(groups))
                                                      if groups > 1 else ())
    return merge_round(self, st, job_id, rnd, nodes, deadline, lambda seal: _aggregate(st, job_id, rnd, seal, groups),
                       side_blobs=side, root=groups > 1)


@app.task(bind=True, name=keys.FPLD_GROUP_MERGE_TASK)
def fpld_group_merge(self, job_id: str, rnd: int, deadline: float, group: int) -> dict:
    """A two-level round's group aggregator: fold this group's payloads into partial sums for the root."""
    st = store()
    nodes = merge_groups(job_config(job_id).node_ids, round_groups(st, job_id, rnd))[group]

    def merge(seal: Seal) -> tuple[bytes, dict]:
        acc, _ = _round_merge(st, job_id, rnd, blob(st, job_id, f"student/{rnd}"))
        t = time.perf_counter()
        final = _fold_nodes(st, job_id, rnd, seal, acc)
        return acc.partial(f"g{group}"), {"nodes": final, "merged": acc.count, "t_merge": time.perf_counter() - t}

    return group_merge_round(self, st, job_id, rnd, group, nodes, deadline, merge)


def _round_merge(st: Store, job_id: str, rnd: int, student: bytes):
    """An empty merge of this round, and the seconds its reference logits took (sparse payloads:
    the broadcast student's own probe forward, model compute rather than merging)."""
    from pipeline.fpld.merge import RoundMerge
    from pipeline.fpld.steps import reference_logits
    from pipeline.models.lm import vocab_size

    cfg = job_config(job_id)
    sparse = cfg.method == "fpld" and cfg.payload == "sparse"
    reference, t = None, time.perf_counter()
    if sparse:
        reference = reference_logits(cfg, student, public_windows(job_id, "probe"), device_for(cfg.device))
    t_reference = time.perf_counter() - t
    return RoundMerge(cfg, job=job_id, rnd=rnd, vocab=vocab_size(cfg.model_spec()), secret=secret(),
                      max_bytes=settings_of(app).max_payload_bytes, reference=reference), t_reference


def _fold_nodes(st: Store, job_id: str, rnd: int, seal: Seal, merge) -> dict[str, dict]:
    """Fold every arrived payload into `merge`; the final record of each of seal's nodes."""

    def fold(node: str, payload: bytes) -> tuple[None, int]:
        return None, merge.fold(node, payload, st.get_blob(job_id, f"diag/{rnd}/{node}"))

    _, final = classify_nodes(st, job_id, rnd, seal.states, fold)
    for node, v in final.items():
        st.node_update(job_id, rnd, node, final=v["status"])
    return final


def _fold_groups(st: Store, job_id: str, rnd: int, seal: Seal, merge, groups: int) -> tuple[dict[str, dict], list]:
    """The root's merge: add each written group's partial sums; a node whose group is not written
    (or whose partial is bad) did not merge. Returns the final records and each group's merge time."""
    records = group_results(st, job_id, rnd, groups)
    final: dict[str, dict] = {}

    def fold(g: int) -> None:
        merge.fold_partial(f"g{g}", blob(st, job_id, f"partial/{rnd}/{g}"))

    # fetched and decoded a few at a time, as node payloads are (broker/round_gate.classify_nodes)
    with ThreadPoolExecutor(max_workers=MERGE_THREADS) as pool:
        folds = {g: pool.submit(fold, g) for g, record in records.items() if "error" not in record}
    for g, record in records.items():
        group_final = record["nodes"]
        try:
            if g in folds:
                folds[g].result()
        except PayloadError as e:
            group_final = {n: {"status": NodeStatus.REJECTED.value, "reason": f"group {g}'s partial: {e}",
                               "retries": v.get("retries", 0)} for n, v in group_final.items()}
        final.update(group_final)
    for node in seal.states:
        if node not in final:
            final[node] = {"status": NodeStatus.LATE.value, "reason": "its group's merge did not finish", "retries": 0}
            st.node_update(job_id, rnd, node, final=NodeStatus.LATE.value)
    return {n: final[n] for n in seal.states}, [records[g].get("t_merge") for g in sorted(records)]


def _aggregate(st: Store, job_id: str, rnd: int, seal: Seal, groups: int) -> dict:
    from pipeline.fpld.steps import average_weights, merge_and_distill

    job = JobRecord(st.r, job_id)
    cfg = job_config(job_id)
    device = device_for(cfg.device)
    student = blob(st, job_id, f"student/{rnd}")
    probe, eval_windows = public_windows(job_id, "probe"), public_windows(job_id, "eval")
    merge, t_reference = _round_merge(st, job_id, rnd, student)
    t_merge = time.perf_counter()
    result: dict = {"round": rnd, "open_s": seal.open_s, "sealed_at": seal.sealed_at}
    if groups > 1:
        final, result["t_group_merge"] = _fold_groups(st, job_id, rnd, seal, merge, groups)
    else:
        final = _fold_nodes(st, job_id, rnd, seal, merge)
    result.update(nodes=final, merged=merge.count, t_merge=time.perf_counter() - t_merge,
                  t_reference=t_reference)
    error = quorum_error(rnd, final, cfg.nodes, cfg.effective_quorum)
    if error is not None:
        job.event("round_failed", round=rnd, error=error)
        return {**result, "status": "failed", "error": error}

    def progress(step: int, loss: float) -> None:
        st.node_update(job_id, rnd, "aggregator", step=step, loss=round(loss, 4))

    t_learn = time.perf_counter()  # the aggregator's own learning work: averaging or distillation, and eval
    if cfg.method == "fedavg":
        st.node_update(job_id, rnd, "aggregator", status=f"averaging {merge.count} nodes' weights")
        new, metrics = average_weights(cfg, student, merge.teacher.means(), eval_windows, device)
    else:
        st.node_update(job_id, rnd, "aggregator", status=f"distilling from {merge.count} nodes")
        new, metrics = merge_and_distill(cfg, job=job_id, rnd=rnd, student=student, teacher=merge.teacher.mean(),
                                         probe=probe, eval_windows=eval_windows, full_teacher=merge.full_teacher(),
                                         progress=progress, device=device)
    t_learn = time.perf_counter() - t_learn
    st.put_blob_once(job_id, f"student/{rnd + 1}", new)
    st.node_update(job_id, rnd, "aggregator", status="done", final="merged")
    job.event("round_merged", round=rnd, merged=merge.count)
    return {**result, "status": "ok", "finished_at": time.time(), "t_learn": t_learn, **metrics}
