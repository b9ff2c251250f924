"""FPLD's Celery tasks: a node's round and the aggregator's round, thin over pipeline/fpld/steps.py."""

from __future__ import annotations

import time
from functools import cache

from broker import keys
from broker.app import app, settings_of
from broker.faults import Fault, parse_faults
from broker.jobs import JobRecord
from broker.round_gate import Seal, classify_nodes, quorum_error
from broker.store import Store
from broker.wire.codec import decode_logits, encode_logits
from pipeline.aggregate import RunningMean
from pipeline.fpld.config import FPLDConfig
from workers.base import FleetTask, blob, merge_round, private_tokens, secret, state_dir, store


@cache
def job_config(job_id: str) -> FPLDConfig:
    """A job's config never changes, so it is read once per worker process."""
    return FPLDConfig.from_dict(JobRecord(store().r, job_id).config())


def fault_of(job_id: str, rnd: int, node: str) -> Fault | None:
    fault = parse_faults(job_config(job_id).faults).get(node)
    return fault if fault and fault.fires(rnd) else None


@app.task(bind=True, base=FleetTask, name=keys.FPLD_NODE_TASK, node_task=True,
          fault_of=staticmethod(fault_of))
def fpld_node_round(self, job_id: str, rnd: int, node: str) -> dict:
    """Fine-tune on private data, send quantized probe logits. Returns a small receipt."""
    from pipeline.data import windows_from_bytes
    from pipeline.fpld.steps import node_round

    run = self.begin(job_id, rnd, node, skip_if_sealed=True,
                     done=lambda st: st.get_payload(job_id, rnd, node) is not None)
    if run is None:
        return {"node": node, "round": rnd, "status": "skipped"}
    cfg = job_config(job_id)
    ckpt_path = state_dir() / "checkpoints" / f"{job_id}-r{rnd}-n{node}.safetensors"
    out = node_round(cfg, job=job_id, rnd=rnd, node=node, student=run.blob(f"student/{rnd}"),
                     private=private_tokens(), probe=windows_from_bytes(run.blob("probe"), cfg.block_size),
                     eval_windows=windows_from_bytes(run.blob("eval"), cfg.block_size),
                     secret=secret(), progress=run.progress, checkpoint=ckpt_path)
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
    from pipeline.data import windows_from_bytes
    from pipeline.fpld.steps import merge_and_distill

    job = JobRecord(st.r, job_id)
    cfg = job_config(job_id)

    teacher, full = RunningMean(), RunningMean()

    def fold(node: str, payload: bytes) -> tuple[None, int]:
        """Decode strictly and add into the running means at once: no payload is kept."""
        x, meta = decode_logits(payload, secret=secret(), max_bytes=settings_of(app).max_payload_bytes,
                                expect_shape=(cfg.probe_seqs * cfg.block_size, 256),
                                expect_job=job_id, expect_round=rnd, expect_node=node)
        diag = st.get_blob(job_id, f"diag/{rnd}/{node}")
        if diag is not None:
            full.add(decode_logits(diag, secret=secret())[0])
        teacher.add(x)
        return None, meta.nbytes

    _, final = classify_nodes(st, job_id, rnd, seal.states, fold)
    for node, v in final.items():
        st.node_update(job_id, rnd, node, final=v["status"])
    result: dict = {"round": rnd, "nodes": final, "merged": teacher.count, "open_s": seal.open_s,
                    "sealed_at": seal.sealed_at}
    error = quorum_error(rnd, final, cfg.nodes, cfg.effective_quorum)
    if error is not None:
        job.event("round_failed", round=rnd, error=error)
        return {**result, "status": "failed", "error": error}

    def progress(step: int, loss: float) -> None:
        st.node_update(job_id, rnd, "aggregator", step=step, loss=round(loss, 4))

    st.node_update(job_id, rnd, "aggregator", status=f"distilling from {teacher.count} nodes")
    student, metrics = merge_and_distill(
        cfg, job=job_id, rnd=rnd, student=blob(st, job_id, f"student/{rnd}"), teacher=teacher.mean(),
        probe=windows_from_bytes(blob(st, job_id, "probe"), cfg.block_size),
        eval_windows=windows_from_bytes(blob(st, job_id, "eval"), cfg.block_size),
        full_teacher=full.mean() if full.count and full.count == teacher.count else None,  # like with like
        progress=progress)
    st.put_blob_once(job_id, f"student/{rnd + 1}", student)
    st.node_update(job_id, rnd, "aggregator", status="done", final="merged")
    job.event("round_merged", round=rnd, merged=teacher.count)
    return {**result, "status": "ok", "finished_at": time.time(), **metrics}
