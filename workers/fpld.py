"""FPLD's Celery tasks: a node's round and the aggregator's round, thin over pipeline/fpld/steps.py."""

from __future__ import annotations

import time
from functools import cache, lru_cache

from broker import keys
from broker.app import app, settings_of
from broker.faults import Fault, parse_faults
from broker.jobs import JobRecord
from broker.round_gate import Seal, classify_nodes, quorum_error
from broker.store import Store
from broker.wire.codec import encode_logits
from pipeline.fpld.config import FPLDConfig
from workers.base import FleetTask, blob, device_for, merge_round, private_ids, secret, state_dir, store


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
    """Once every node is in or the deadline has passed: seal the round, merge what arrived, distill."""
    st = store()
    nodes = job_config(job_id).node_ids
    return merge_round(self, st, job_id, rnd, nodes, deadline, lambda seal: _aggregate(st, job_id, rnd, seal),
                       side_blobs=tuple(f"diag/{rnd}/{n}" for n in nodes))


def _aggregate(st: Store, job_id: str, rnd: int, seal: Seal) -> dict:
    from pipeline.fpld.merge import RoundMerge
    from pipeline.fpld.steps import average_weights, merge_and_distill, reference_logits
    from pipeline.models.lm import vocab_size

    job = JobRecord(st.r, job_id)
    cfg = job_config(job_id)
    device = device_for(cfg.device)
    student = blob(st, job_id, f"student/{rnd}")
    probe, eval_windows = public_windows(job_id, "probe"), public_windows(job_id, "eval")
    sparse = cfg.method == "fpld" and cfg.payload == "sparse"
    merge = RoundMerge(cfg, job=job_id, rnd=rnd, vocab=vocab_size(cfg.model_spec()), secret=secret(),
                       max_bytes=settings_of(app).max_payload_bytes,
                       reference=reference_logits(cfg, student, probe, device) if sparse else None)

    def fold(node: str, payload: bytes) -> tuple[None, int]:
        return None, merge.fold(node, payload, st.get_blob(job_id, f"diag/{rnd}/{node}"))

    t_merge = time.perf_counter()
    _, final = classify_nodes(st, job_id, rnd, seal.states, fold)
    t_merge = time.perf_counter() - t_merge
    for node, v in final.items():
        st.node_update(job_id, rnd, node, final=v["status"])
    result: dict = {"round": rnd, "nodes": final, "merged": merge.count, "open_s": seal.open_s,
                    "sealed_at": seal.sealed_at, "t_merge": t_merge}
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
