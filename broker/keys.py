"""Every name the fleet's processes must agree on: Redis keys, task names, queue names.

Submitters send tasks by name and never import task code (nor torch) to do it, so these strings
are the protocol between `pipeline/` drivers and `workers/`. One place, so a typo cannot create
a queue nobody consumes or a key nobody reads.
"""

from __future__ import annotations

PREFIX = "lmteam"

# --- queues -----------------------------------------------------------------------------------
AGGREGATOR_QUEUE = "aggregator"
EXPERT_QUEUE = "experts"
NODE_QUEUE_PREFIX = "node."


def node_queue(node_id: int | str) -> str:
    """A node's own queue: only the worker holding that node's private data consumes it."""
    return f"{NODE_QUEUE_PREFIX}{node_id}"


SERVE_QUEUE_PREFIX = "expert."  # not EXPERT_QUEUE ("experts", training): one serving queue per expert


def expert_queue(expert: int | str) -> str:
    """The queue of a served expert: every replica of expert I consumes `expert.<I>`."""
    return f"{SERVE_QUEUE_PREFIX}{expert}"


# --- task names -------------------------------------------------------------------------------
FPLD_NODE_TASK = "lmteam.fpld.node_round"
FPLD_AGGREGATE_TASK = "lmteam.fpld.aggregate_round"
FPLD_GROUP_MERGE_TASK = "lmteam.fpld.group_merge"  # a two-level round's group aggregator
RAG_INDEX_TASK = "lmteam.rag.node_index"
RAG_SCORE_TASK = "lmteam.rag.node_score"
RAG_AGGREGATE_TASK = "lmteam.rag.aggregate"
SMALLTALK_ROUTER_TASK = "lmteam.smalltalk.train_router"
SMALLTALK_SCORE_TASK = "lmteam.smalltalk.score"
SMALLTALK_EXPERT_TASK = "lmteam.smalltalk.train_expert"
SERVE_TASK = "lmteam.serve.generate"  # first argument: the expert, whose queue it goes to

# Tasks whose third argument is the node id: they go to that node's queue.
NODE_TASKS = frozenset({FPLD_NODE_TASK, RAG_INDEX_TASK, RAG_SCORE_TASK})
# Tasks whose first argument is a served expert: they go to that expert's queue.
EXPERT_TASKS = frozenset({SERVE_TASK})
STATIC_ROUTES = {
    FPLD_AGGREGATE_TASK: AGGREGATOR_QUEUE,
    FPLD_GROUP_MERGE_TASK: AGGREGATOR_QUEUE,
    RAG_AGGREGATE_TASK: AGGREGATOR_QUEUE,
    SMALLTALK_ROUTER_TASK: EXPERT_QUEUE,
    SMALLTALK_SCORE_TASK: AGGREGATOR_QUEUE,
    SMALLTALK_EXPERT_TASK: EXPERT_QUEUE,
}

# --- Redis keys -------------------------------------------------------------------------------
JOBS = f"{PREFIX}:jobs"  # sorted set of job ids by creation time
WORKERS = f"{PREFIX}:workers"  # hash: celery hostname -> registry entry (JSON)
WORKER_BEATS = f"{PREFIX}:workers:beats"  # hash: celery hostname -> last heartbeat, Redis clock
SECRET_FINGERPRINT = f"{PREFIX}:fleet:secret-fingerprint"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def blob(job_id: str, name: str) -> str:
    return f"{PREFIX}:blob:{job_id}:{name}"


def payload(job_id: str, rnd: int, node: str) -> str:
    return f"{PREFIX}:payload:{job_id}:{rnd}:{node}"


def staged_payload(job_id: str, rnd: int, node: str, token: str) -> str:
    """Where a payload is written with a plain SET before the round gate moves it into place."""
    return f"{PREFIX}:staged:{job_id}:{rnd}:{node}:{token}"


def chunks(job_id: str, token: str) -> str:
    """Prefix of the chunks of one value too large for one Redis string (broker/store.py)."""
    return f"{PREFIX}:chunk:{job_id}:{token}"


def node(job_id: str, rnd: int, node_name: str) -> str:
    return f"{PREFIX}:node:{job_id}:{rnd}:{node_name}"


def node_scan_prefix(job_id: str) -> str:
    """Prefix of every per-round node hash of a job (for `lmteam status` of any job kind)."""
    return f"{PREFIX}:node:{job_id}:"


def closed(job_id: str, rnd: int) -> str:
    return f"{PREFIX}:closed:{job_id}:{rnd}"


def round_result(job_id: str, rnd: int) -> str:
    return f"{PREFIX}:round:{job_id}:{rnd}"


def arrived(job_id: str, rnd: int) -> str:
    """List a node pushes to when its part of a round is over: wakes whoever waits for the nodes."""
    return f"{PREFIX}:arrive:{job_id}:{rnd}"


def round_spec(job_id: str, rnd: int) -> str:
    """Hash: the nodes a round waits for and the task that merges them (broker/round_gate.py)."""
    return f"{PREFIX}:spec:{job_id}:{rnd}"


def arrived_set(job_id: str, rnd: int) -> str:
    """Set of the nodes whose part of a round is over (arrived or failed)."""
    return f"{PREFIX}:in:{job_id}:{rnd}"


def merge_owner(job_id: str, rnd: int) -> str:
    """The id of the one task that merges a round (a redelivered copy of it keeps the id)."""
    return f"{PREFIX}:owner:{job_id}:{rnd}"


def group_arrived_set(job_id: str, rnd: int, group: int) -> str:
    """Set of one merge group's nodes whose part is over (a two-level merge; the gate's Lua builds
    the same name from arrived_set)."""
    return f"{arrived_set(job_id, rnd)}:g{group}"


def group_owner(job_id: str, rnd: int, group: int) -> str:
    """The id of the one task that merges a group of a two-level round."""
    return f"{PREFIX}:owner:{job_id}:{rnd}:g{group}"


def group_result(job_id: str, rnd: int, group: int) -> str:
    """A group merge's outcome: its nodes' final records (the partial sums are a blob)."""
    return f"{PREFIX}:gresult:{job_id}:{rnd}:g{group}"


def groups_done(job_id: str, rnd: int) -> str:
    """Set of the groups of a two-level round whose merge is written: the last one sends the root's."""
    return f"{PREFIX}:groups:{job_id}:{rnd}"


def worker_claims(hostname: str) -> str:
    """Set of the merge tasks a worker has claimed and not finished (restored if it restarts)."""
    return f"{PREFIX}:claims:{hostname}"


def done(job_id: str, rnd: int) -> str:
    """List pushed to once a round's result is written: wakes the submitter at once."""
    return f"{PREFIX}:done:{job_id}:{rnd}"


def round_counter(job_id: str) -> str:
    """Next round number of a job whose rounds are numbered as they come (FC-RAG queries)."""
    return f"{PREFIX}:rounds:{job_id}"


# --- serving a mixture (broker/serving.py) ------------------------------------------------------
SERVE_PREFIX = f"{PREFIX}:serve"


def serve_request(rid: str) -> str:
    """A request's body (msgpack: run, prompt ids, sampling), written once by the submitter."""
    return f"{SERVE_PREFIX}:req:{rid}"


def serve_pending(expert: int | str) -> str:
    """List of request ids waiting for a replica of `expert`; replicas pop batches from it."""
    return f"{SERVE_PREFIX}:pending:{expert}"


def serve_claim(rid: str) -> str:
    """The Celery hostname of the replica generating a request (the submitter resends if it is lost)."""
    return f"{SERVE_PREFIX}:claim:{rid}"


def serve_answer(rid: str) -> str:
    """A request's answer, SET NX: the first replica to finish is the only answer ever delivered."""
    return f"{SERVE_PREFIX}:answer:{rid}"


def serve_runs(rid: str) -> str:
    """How many times a request was generated (more than once only after a failover)."""
    return f"{SERVE_PREFIX}:runs:{rid}"


def serve_wake(submission: str) -> str:
    """List a replica pushes to after answering requests of a submission: wakes the submitter."""
    return f"{SERVE_PREFIX}:wake:{submission}"


def serve_delivered(submission: str) -> str:
    """List of the request ids whose answer was stored, one entry per stored answer (audits duplicates)."""
    return f"{SERVE_PREFIX}:delivered:{submission}"
