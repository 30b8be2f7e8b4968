"""The automatic index choice: Flat, HNSW, IVF-Flat or IVF-PQ from the number of vectors, their dimension and a
memory budget, with the reason; and how many shards to build (docs/index.md, "The automatic choice")."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from configs.errors import RagtuneError

# Defaults of the automatic choice (docs/index.md explains each).
SHARD_VECTORS = 2_000_000  # one shard per this many vectors when index.shards is null
HNSW_MAX_VECTORS = 10_000_000  # beyond this, HNSW builds take hours per shard: IVF trains once and adds fast
TRAIN_PER_LIST = 50  # training vectors per IVF list (FAISS warns below 39)
PQ_TRAIN_MIN = 10_000  # PQ codebooks have 256 centroids: 39 x 256 points at least
IDMAP2_BYTES = 56  # per vector: the int64 id + its entry in IndexIDMap2's reverse map (measured)
GPU_PQ_SUBDIMS = {1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32}  # d / m that faiss GPU IVF-PQ supports
PQ_MAX_SUBDIM = 16  # coarsest PQ code auto picks: one byte per 16 dimensions (coarser loses too much recall: plan
# more nodes instead)
PQ_NBITS = 8  # bits per PQ sub-quantizer code (256 centroids each: FAISS's default, the fastest CPU scan)
NODE_HEADROOM = 0.10  # multi-node plans: share of each node's budget left for the process, queries and list slack
QUANTIZER_SHARE = 0.10  # multi-node plans: the shards' copies of the coarse quantizer take at most this share of a node
MAX_SHARDS = 4096  # the most shards index.shards allows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class IndexChoice:
    """Which index to build and why."""

    factory: str  # FAISS factory string (IDMap2 is added at build time where the kind keeps no ids)
    kind: str  # flat | hnsw | ivf_flat | ivf_pq | custom
    reason: str
    est_bytes: int | None  # estimated memory of the whole index once loaded (all nodes); None for custom strings
    train_size: int  # vectors to train on; 0 = the index needs no training
    nodes: int = 1  # nodes of index.max_memory each that hold the index (more than 1: a multi-node plan)
    shards: int | None = None  # shards the plan needs (multi-node plans); None = default_num_shards decides


def nlist_for(nb: int, train_sample: int | None = None) -> int:
    """IVF lists: the power of two at or below 4 * sqrt(nb) (FAISS's guideline is 4-16 x sqrt(nb)), and at
    most what ``train_sample`` vectors can train (39 per list)."""
    n = 2 ** max(4, int(math.floor(math.log2(max(4 * math.sqrt(nb), 16)))))
    limit = min(nb, train_sample) if train_sample else nb
    while n > 16 and 39 * n > limit:
        n //= 2
    return n


def pq_sizes(d: int, use_gpu: bool = False) -> list[int]:
    """Bytes per vector (PQ sub-quantizers m, 8 bits each) that divide ``d``, largest first, at most
    ``PQ_MAX_SUBDIM`` dimensions per byte."""
    sizes = [m for m in range(min(96, d // 2), 3, -1) if d % m == 0 and d // m <= PQ_MAX_SUBDIM]
    if use_gpu:
        sizes = [m for m in sizes if d // m in GPU_PQ_SUBDIMS]
    return sizes


def quantizer_bytes(nlist: int, d: int, use_gpu: bool = False) -> int:
    """The coarse quantizer: ``nlist`` centroids of d floats, plus HNSW32 links from 65,536 lists on CPU (``_ivf``)."""
    return nlist * 4 * d + (nlist * 9 * 32 if nlist >= 65536 and not use_gpu else 0)


def estimate_bytes(kind: str, nb: int, d: int, *, M: int = 32, nlist: int = 0, m: int = 0,
                   refine: bool = False) -> int:
    """Memory of an index once loaded (as autofaiss estimates it: codes + ids + coarse quantizer).

    Building can take up to ~1.5x of one shard while inverted lists grow.
    """
    quantizer = quantizer_bytes(nlist, d)
    if kind == "flat":
        return nb * (4 * d + IDMAP2_BYTES)
    if kind == "hnsw":
        return nb * (4 * d + 9 * M + IDMAP2_BYTES)  # level 0 keeps 2M links of 4 bytes, upper levels ~M/8
    if kind == "ivf_flat":
        return nb * (4 * d + 8) + quantizer
    if kind == "ivf_pq":
        per = m + 8 + (d + IDMAP2_BYTES if refine else 0)
        return nb * per + quantizer + 256 * 4 * d
    raise ValueError(f"unknown index kind {kind!r}")


def _ivf(nlist: int, use_gpu: bool) -> str:
    # a flat coarse quantizer compares every query with every list; past 64k lists a graph is cheaper (CPU)
    return f"IVF{nlist}_HNSW32" if nlist >= 65536 and not use_gpu else f"IVF{nlist}"


def _train_size(nb: int, nlist: int, pq: bool, train_sample: int | None) -> int:
    want = train_sample if train_sample else max(TRAIN_PER_LIST * nlist, PQ_TRAIN_MIN if pq else 0)
    return min(nb, want)


def choose_index(nb: int, d: int, max_memory: int, *, use_gpu: bool = False, exact_below: int = 10_000,
                 train_sample: int | None = None, max_nodes: int = 1) -> IndexChoice:
    """Pick Flat / HNSW / IVF-Flat / IVF-PQ (+ refinement) from size, dimension and a memory budget.

    Rules, in order (after autofaiss's ``get_optimal_index_keys_v2``, with an exact tier first):

    1. fewer than ``exact_below`` vectors: Flat (exact; fast enough, nothing to tune);
    2. CPU, at most 10M vectors: HNSW32 (else HNSW16) if it fits: the fastest at high recall, no training;
    3. IVF-Flat if it fits (GPUs: the first choice, faiss has no GPU HNSW): exact distances in the lists;
    4. IVF-PQ with SQ8 refinement if it fits: PQ codes scan fast, the refinement restores the top ranks;
    5. IVF-PQ with the largest code that fits (at most ``PQ_MAX_SUBDIM`` dimensions per code byte);
    (PQ codes are trained without polysemous training, ``np``: it is only used by Hamming-threshold search)
    6. nothing fits one node: IVF-PQ with rule 4's code (no refinement) spread over the fewest nodes of
       ``max_memory`` each (:func:`plan_nodes`; the choice's ``nodes`` and ``shards`` say how), the arithmetic in
       the reason; a RagtuneError only when even the most compact plan does not fit a node.

    Rules 5 and 6 are lossy (PQ codes without refinement: recall may stay below the target). Before either, with
    ``max_nodes`` > 1, a more exact plan across nodes wins when it needs at most ``max_nodes`` nodes
    (:func:`plan_exact_nodes`): IVF-PQ with rule 4's code and SQ8 refinement, or IVF-Flat, whichever needs fewer
    nodes (a tie: IVF-Flat), sharded as :func:`node_plan` does. With ``max_nodes`` = 1 the rules are 1 to 6 alone.

    Args:
        nb: vectors to index.
        d: their dimension.
        max_memory: bytes the whole index may take in RAM on one node (multi-node plans: on each node).
        max_nodes: nodes a plan may spread a more exact index over instead of a lossy one (index.max_nodes,
            resolved by the job: ``auto`` = the Ray cluster's alive nodes); 1 = one node unless nothing fits it.
        use_gpu: the build runs on GPUs (HNSW is skipped: faiss has no GPU HNSW).
        exact_below: rule 1's threshold.
        train_sample: vectors available for training, when the user fixed it (limits the IVF lists).
    """
    budget = human_bytes(max_memory)
    flat = estimate_bytes("flat", nb, d)
    if nb < exact_below and flat <= max_memory:
        return IndexChoice("Flat", "flat", f"{nb:,} vectors < index.exact_below ({exact_below:,}): exact search is "
                           f"fast enough and needs no tuning ({human_bytes(flat)} <= {budget})", flat, 0)
    why_not_hnsw = "the build runs on GPUs (faiss has no GPU HNSW)" if use_gpu else ""
    if not use_gpu and nb > HNSW_MAX_VECTORS:
        why_not_hnsw = f"{nb:,} vectors > {HNSW_MAX_VECTORS:,} (HNSW would take hours to build per shard)"
    if not why_not_hnsw:
        for M in (32, 16):
            est = estimate_bytes("hnsw", nb, d, M=M)
            if est <= max_memory:
                return IndexChoice(f"HNSW{M}", "hnsw", f"HNSW{M} fits the budget ({human_bytes(est)} <= {budget}): "
                                   "the fastest kind on CPU at high recall, no training", est, 0)
        why_not_hnsw = f"HNSW16 needs {human_bytes(estimate_bytes('hnsw', nb, d, M=16))} > {budget}"
    nlist = nlist_for(nb, train_sample)
    est = estimate_bytes("ivf_flat", nb, d, nlist=nlist)
    if est <= max_memory:
        return IndexChoice(f"{_ivf(nlist, use_gpu)},Flat", "ivf_flat",
                           f"{why_not_hnsw}; IVF{nlist}-Flat fits ({human_bytes(est)} <= {budget}): exact distances "
                           "inside the probed lists", est, _train_size(nb, nlist, False, train_sample))
    why_not_flat = f"IVF-Flat needs {human_bytes(est)} > {budget}"
    sizes = pq_sizes(d, use_gpu)
    if not sizes:
        raise RagtuneError(f"d = {d} has no divisor usable as a PQ code size and IVF-Flat needs {human_bytes(est)} > "
                           f"index.max_memory = {budget}. Fix: raise index.max_memory, or set index.kind to a "
                           f"factory string such as IVF{nlist},SQ8")
    refined = [m for m in sizes if d // m >= 8] or sizes[-1:]  # ~8 dims per code byte: fast, refinement fixes the rest
    m = refined[0]
    est = estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=m, refine=True)
    if est <= max_memory:
        return IndexChoice(f"{_ivf(nlist, use_gpu)},PQ{m}np,Refine(SQ8)", "ivf_pq",
                           f"{why_not_hnsw}; {why_not_flat}; IVF-PQ{m} with SQ8 refinement fits ({human_bytes(est)} "
                           f"<= {budget}): PQ scans fast, re-ranking on 8-bit codes restores recall", est,
                           _train_size(nb, nlist, True, train_sample))
    lossy = next(((c, e) for c in sizes if (e := estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=c)) <= max_memory),
                 None)
    if lossy is not None:
        why = (f"{why_not_hnsw}; {why_not_flat}; refinement codes do not fit ({human_bytes(est)} > {budget}); "
               f"IVF-PQ{lossy[0]} is the largest code that fits ({human_bytes(lossy[1])} <= {budget})")
    else:
        smallest = estimate_bytes("ivf_pq", nb, d, nlist=nlist, m=sizes[-1])
        why = (f"{nb:,} vectors of d = {d} fit no single node: the smallest index, {_ivf(nlist, use_gpu)},"
               f"PQ{sizes[-1]}, needs {human_bytes(smallest)} > index.max_memory = {budget}")
    exact, short = plan_exact_nodes(nb, d, max_memory, max_nodes, nlist, m, use_gpu, train_sample, why)
    if exact is not None:
        return exact
    if lossy is not None:
        return IndexChoice(f"{_ivf(nlist, use_gpu)},PQ{lossy[0]}np", "ivf_pq",
                           f"{why}; recall may stay below the target{short}", lossy[1],
                           _train_size(nb, nlist, True, train_sample))
    choice = plan_nodes(nb, d, max_memory, nlist, m, sizes, use_gpu, train_sample, why)
    return replace(choice, reason=choice.reason + short)


@dataclass(frozen=True)
class NodePlan:
    """An IVF index spread over nodes: the arithmetic behind a multi-node choice."""

    nlist: int
    m: int  # PQ sub-quantizers: code bytes per vector at PQ_NBITS = 8 (0: IVF-Flat)
    nbits: int
    shard_vectors: int  # vectors per shard (the last shard may hold fewer)
    shards: int
    shards_per_node: int
    nodes: int
    bytes_per_vector: int  # code (+ refinement code) + id
    bytes_per_shard_fixed: int  # the shard's copy of the coarse quantizer (+ PQ codebooks)
    bytes_per_node: int  # a full node: shards_per_node x (shard_vectors x bytes_per_vector + fixed)
    total_bytes: int  # every shard
    kind: str = "ivf_pq"  # ivf_pq | ivf_flat
    refine: bool = False  # IVF-PQ re-ranked on SQ8 codes (d bytes a vector, and IDMap2's id map)

    def arithmetic(self, nb: int, d: int, max_memory: int, use_gpu: bool = False) -> str:
        usable = int(max_memory * (1 - NODE_HEADROOM))
        q = quantizer_bytes(self.nlist, d, use_gpu)
        links = f" + {self.nlist:,} x 288 B HNSW links" if q > self.nlist * 4 * d else ""
        if self.kind == "ivf_flat":
            per = f"per vector {d} x 4 B float + 8 B id = {self.bytes_per_vector} B"
            books = ""
        else:
            per = f"per vector {self.m} B PQ{self.m}x{self.nbits} code + 8 B id"
            per += (f" + {d} B SQ8 refinement code + {IDMAP2_BYTES} B id map = {self.bytes_per_vector} B"
                    if self.refine else f" = {self.bytes_per_vector} B")
            books = f" and of the PQ codebooks ({2 ** self.nbits} x {d} x 4 B = {human_bytes(2 ** self.nbits * 4 * d)})"
        return (f"{per}; per shard a copy of the quantizer ({self.nlist:,} x {d} x 4 B{links} = {human_bytes(q)})"
                f"{books}; per node "
                f"{human_bytes(max_memory)} - {NODE_HEADROOM:.0%} headroom = {human_bytes(usable)} >= "
                f"{self.shards_per_node} shard(s) x ({self.shard_vectors:,} x {self.bytes_per_vector} B + "
                f"{human_bytes(self.bytes_per_shard_fixed)}) = {human_bytes(self.bytes_per_node)}; nodes = "
                f"ceil({nb:,} / {self.shards_per_node * self.shard_vectors:,} vectors per node) = {self.nodes}, "
                f"{self.shards} shards, {human_bytes(self.total_bytes)} in all")


def node_plan(nb: int, d: int, max_memory: int, nlist: int, m: int, nbits: int = PQ_NBITS,
              use_gpu: bool = False, *, kind: str = "ivf_pq", refine: bool = False) -> NodePlan | None:
    """Spread an IVF{nlist},PQ{m}x{nbits} index (``refine``: + SQ8 refinement; ``kind`` ivf_flat: IVF{nlist},Flat,
    ``m`` unused) of ``nb`` vectors over the fewest nodes of ``max_memory`` each.

    A node keeps ``NODE_HEADROOM`` of its budget free; the rest holds ``s`` shards, each ``shard_vectors`` x its
    bytes per vector (PQ code + 8-byte id, + d bytes of SQ8 code and IDMap2's id map when refined; IVF-Flat: 4d
    + 8) plus its own copy of the coarse quantizer (and PQ codebooks). Shards hold ``SHARD_VECTORS`` vectors
    (2M, as on one node) unless their quantizer copies would take more than ``QUANTIZER_SHARE`` of the node:
    then there are fewer, larger shards per node (at least one). None when one shard's fixed part does not fit a
    node, or the plan needs more than ``MAX_SHARDS`` shards.
    """
    usable = int(max_memory * (1 - NODE_HEADROOM))
    if kind == "ivf_flat":
        m, refine = 0, False
        per_vector = 4 * d + 8
        fixed = quantizer_bytes(nlist, d, use_gpu)
    else:
        per_vector = m * nbits // 8 + 8 + (d + IDMAP2_BYTES if refine else 0)
        fixed = quantizer_bytes(nlist, d, use_gpu) + 2**nbits * 4 * d
    if usable - fixed < per_vector:
        return None
    fit_one = (usable - fixed) // per_vector  # vectors a node holds as one shard
    s = max(1, min(math.ceil(fit_one / SHARD_VECTORS), int(usable * QUANTIZER_SHARE // fixed)))
    shard_vectors = (usable - s * fixed) // per_vector // s
    if shard_vectors < 1:
        return None
    shard_vectors = min(shard_vectors, nb)
    shards = math.ceil(nb / shard_vectors)
    s = min(s, shards)
    if shards > MAX_SHARDS:
        return None
    nodes = math.ceil(shards / s)
    return NodePlan(nlist, m, nbits, shard_vectors, shards, s, nodes, per_vector, fixed,
                    s * (shard_vectors * per_vector + fixed), nb * per_vector + shards * fixed, kind, refine)


def plan_exact_nodes(nb: int, d: int, max_memory: int, max_nodes: int, nlist: int, m: int, use_gpu: bool,
                     train_sample: int | None, why: str) -> tuple[IndexChoice | None, str]:
    """Before a lossy choice (rules 5 and 6: PQ without refinement): a more exact index spread over at most
    ``max_nodes`` nodes of ``max_memory`` each (:func:`node_plan`), IVF-PQ{m} with SQ8 refinement or IVF-Flat,
    whichever needs fewer nodes (a tie: IVF-Flat, exact distances). Each node beyond one is a cost: the plan
    takes the fewest that bring the recall near the target.

    Returns (the choice, "") when one fits ``max_nodes``, else (None, a clause for the lossy choice's reason
    saying how many nodes the more exact plan would need, "" when none can be planned).
    """
    ivf = _ivf(nlist, use_gpu)
    candidates = [(f"{ivf},Flat", "ivf_flat", f"IVF{nlist}-Flat",
                   node_plan(nb, d, max_memory, nlist, 0, use_gpu=use_gpu, kind="ivf_flat")),
                  (f"{ivf},PQ{m}np,Refine(SQ8)", "ivf_pq", f"IVF-PQ{m} with SQ8 refinement",
                   node_plan(nb, d, max_memory, nlist, m, use_gpu=use_gpu, refine=True))]
    able = sorted([(f, k, n, p) for f, k, n, p in candidates if p is not None], key=lambda c: c[3].nodes)
    if not able:
        return None, ""
    factory, kind, name, plan = able[0]
    if plan.nodes > max_nodes:
        return None, (f"; across nodes {name} would need {plan.nodes} nodes of {human_bytes(max_memory)} > "
                      f"index.max_nodes = {max_nodes} (allow {plan.nodes} for recall near the target)")
    others = "; ".join(f"{n} would need {p.nodes}" for _, _, n, p in able[1:])
    reason = (f"{why}; recall may stay below the target on one node, so the index is planned across at most "
              f"index.max_nodes = {max_nodes} nodes: {name} ({factory}), {plan.shards_per_node} shard(s) per node, "
              f"{plan.nodes} node(s) of index.max_memory = {human_bytes(max_memory)} to serve it"
              f"{f' ({others})' if others else ''} ({plan.arithmetic(nb, d, max_memory, use_gpu)})")
    return IndexChoice(factory, kind, reason, plan.total_bytes, _train_size(nb, nlist, kind == "ivf_pq", train_sample),
                       nodes=plan.nodes, shards=plan.shards), ""


def plan_nodes(nb: int, d: int, max_memory: int, nlist: int, m: int, sizes: list[int], use_gpu: bool,
               train_sample: int | None, why: str) -> IndexChoice:
    """Rule 6: no index fits one node, so IVF-PQ{m} (``m``: the code rule 4 uses, ~8 dimensions per byte, without
    refinement) is spread over nodes of ``max_memory`` each (:func:`node_plan`); coarser codes down to
    ``sizes[-1]`` only if the plan would otherwise need more than ``MAX_SHARDS`` shards. Raises RagtuneError when
    even the coarsest code cannot be planned."""
    budget = human_bytes(max_memory)
    for code in [c for c in sizes if c <= m]:
        plan = node_plan(nb, d, max_memory, nlist, code, use_gpu=use_gpu)
        if plan is not None:
            reason = (f"{why}; planned across nodes: {_ivf(nlist, use_gpu)} coarse quantizer ({nlist:,} lists) + "
                      f"PQ{code}x{PQ_NBITS} codes, {plan.shards_per_node} shard(s) per node, {plan.nodes} node(s) "
                      f"of index.max_memory = {budget} to serve it ({plan.arithmetic(nb, d, max_memory, use_gpu)})")
            return IndexChoice(f"{_ivf(nlist, use_gpu)},PQ{code}np", "ivf_pq", reason, plan.total_bytes,
                               _train_size(nb, nlist, True, train_sample), nodes=plan.nodes, shards=plan.shards)
    fixed = quantizer_bytes(nlist, d, use_gpu) + 2**PQ_NBITS * 4 * d
    per_vector = sizes[-1] + 8
    need = max(fixed + per_vector, math.ceil(nb / MAX_SHARDS) * per_vector + fixed) / (1 - NODE_HEADROOM)
    raise RagtuneError(f"no index kind fits index.max_memory = {budget} for {nb:,} vectors of d = {d}, not even "
                       f"across nodes: the most compact plan, IVF{nlist},PQ{sizes[-1]}x{PQ_NBITS}, needs per node its "
                       f"quantizer and codebooks ({human_bytes(fixed)}) and at most {MAX_SHARDS} shards of "
                       f"{sizes[-1] + 8} B per vector. Fix: raise index.max_memory to at least "
                       f"{human_bytes(need * 1.1)}")


def explicit_choice(factory: str, nb: int, d: int, train_sample: int | None = None) -> IndexChoice:
    """An index the user named with a factory string: classify it and size its training sample."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = bool(re.search(r"PQ\d", factory))
    if ivf:
        nlist = int(ivf.group(1))
        kind = "ivf_pq" if pq else "ivf_flat" if re.search(r"IVF\d+(_\w+)?,Flat", factory) else "custom"
        train = _train_size(nb, nlist, pq, train_sample)
    else:
        kind = "flat" if factory == "Flat" else "hnsw" if factory.startswith("HNSW") else "custom"
        train = min(nb, train_sample or max(PQ_TRAIN_MIN, 10_000))  # used only if the index needs training
    return IndexChoice(factory, kind, f"given as index.kind = {factory!r}", None, train)


def default_num_shards(nb: int, est_bytes: int | None = None, gpu_memory: int | None = None) -> int:
    """One shard per 2M vectors; on GPUs also enough shards that each fits one device."""
    n = max(1, math.ceil(nb / SHARD_VECTORS))
    if gpu_memory and est_bytes:
        n = max(n, math.ceil(est_bytes / gpu_memory))
    return min(n, nb)



# --- memory of one shard task of the build ---------------------------------------------------------------------------

ADD_BATCH = 65_536  # embedding rows a shard task reads and adds at a time (IVF, Flat; HNSW adds a part at a time)
DOCSTORE_RANGE_BYTES = 256 * 2**20  # a shard task writes its docstore in chunk-id ranges of about this much part data
TASK_BASE_BYTES = 400 * 2**20  # a task's interpreter, numpy, pyarrow and faiss before any data
BUILD_GROWTH = 1.5  # an index being built can take this much of its final size (inverted lists grow by doubling)
TEXT_EXPANSION = 3  # docstore text decoded from its Parquet bytes (zstd compresses chunk text ~3x)


def row_bytes(part_bytes: int, rows: int, d: int) -> tuple[int, int]:
    """(docstore bytes a row takes decoded, bytes a row takes in the embedding parts) from the parts' total size:
    a part row is its float32 vector (4d bytes, barely compressible) plus its compressed text and metadata."""
    on_disk = math.ceil(part_bytes / max(rows, 1))
    return max(256, TEXT_EXPANSION * max(0, on_disk - 4 * d)), on_disk


def _factory_sizes(factory: str) -> dict[str, int]:
    """What estimate_bytes needs from a factory string: nlist, m, M, refine."""
    ivf, pq, hnsw = (re.search(p, factory) for p in (r"IVF(\d+)", r"PQ(\d+)", r"HNSW(\d+)"))
    return {"nlist": int(ivf.group(1)) if ivf else 0, "m": int(pq.group(1)) if pq else 0,
            "M": int(hnsw.group(1)) if hnsw and not ivf else 32, "refine": int("Refine" in factory)}


def shard_task_bytes(kind: str, factory: str, shard_vectors: int, d: int, *, doc_row_bytes: int,
                     part_row_bytes: int = 0, batch_rows: int = ADD_BATCH, queries: int = 1000) -> tuple[int, str]:
    """Peak memory of one shard task and the arithmetic behind it (for Ray's ``memory=`` and the log).

    The task reads its rows in batches (``batch_rows`` x (4d + 8) bytes, held about three times: the Arrow batch,
    its numpy view and the contiguous copy FAISS gets), grows the shard's index up to ``BUILD_GROWTH`` x its
    final size, keeps the tuning queries and their results, writes the index and lets it go; then it writes its
    docstore in chunk-id ranges of ``DOCSTORE_RANGE_BYTES`` of part data (``part_row_bytes`` a row on disk; 0:
    the whole shard at once), each range's rows held decoded (``doc_row_bytes`` each). The peak is the larger of
    the two phases, plus ``TASK_BASE_BYTES``. Custom factory strings are sized as Flat (4d + 56 bytes a vector).
    """
    sizes = _factory_sizes(factory)
    est_kind = kind if kind in ("flat", "hnsw", "ivf_flat", "ivf_pq") else "flat"
    index = estimate_bytes(est_kind, shard_vectors, d, M=sizes["M"], nlist=sizes["nlist"], m=sizes["m"] or 8,
                           refine=bool(sizes["refine"]))
    batch = 3 * min(batch_rows, shard_vectors) * (4 * d + 8)
    tuning = queries * (4 * d + 2 * 12 * 11 * 20)  # xq, exact top-k, ~20 candidate settings' (D, I)
    add_phase = int(BUILD_GROWTH * index) + batch + tuning
    ranges = max(1, math.ceil(shard_vectors * part_row_bytes / DOCSTORE_RANGE_BYTES)) if part_row_bytes else 1
    range_rows = math.ceil(shard_vectors / ranges)
    doc_phase = 2 * range_rows * doc_row_bytes  # the range's rows sorted (a copy) while the writer encodes them
    total = TASK_BASE_BYTES + max(add_phase, doc_phase)
    why = (f"{human_bytes(TASK_BASE_BYTES)} base + max(add: {BUILD_GROWTH} x {human_bytes(index)} index of "
           f"{shard_vectors:,} vectors + 3 x {min(batch_rows, shard_vectors):,} x {4 * d + 8} B batch + "
           f"{human_bytes(tuning)} tuning, docstore: 2 x {range_rows:,} rows x {doc_row_bytes} B in {ranges} "
           f"chunk-id range(s)) = {human_bytes(total)}")
    return total, why


def train_task_bytes(train_rows: int, d: int, part_rows: int, part_row_bytes: int,
                     tune_rows: int = 1000) -> tuple[int, str]:
    """Peak memory of the training task and the arithmetic behind it (Ray's ``memory=``, the log).

    The task reads the sampled parts one at a time (a part's table, about ``part_rows`` x ``part_row_bytes``,
    held twice while its rows are picked), gathers the training matrix (``train_rows`` x 4d bytes) and trains:
    FAISS's k-means and the PQ codebook training each take a copy (the residuals), so the matrix is held about
    three times. Measured (bench/scale.py): 2.35 GiB at 409,600 x 384 training vectors from parts of 100,000 rows
    (IVF8192,PQ96np); this estimate 2.47 GiB.
    """
    matrix = train_rows * 4 * d
    part = 2 * part_rows * part_row_bytes
    tuning = tune_rows * 4 * d
    total = TASK_BASE_BYTES + 3 * matrix + part + tuning
    why = (f"{human_bytes(TASK_BASE_BYTES)} base + 3 x {train_rows:,} x {4 * d} B training matrix + 2 x "
           f"{part_rows:,} rows x {part_row_bytes} B part + {human_bytes(tuning)} tuning = {human_bytes(total)}")
    return total, why


# BM25 shard tasks. The build holds about 28 bytes per (chunk, distinct term) pair at its peak (traced: the CSC
# sort), 47 in RSS (bench/lexical_memory.py, SQuAD paragraphs, 50k-100k rows a shard: the batches' triples freed
# at the join stay in malloc's heap), plus the float64 temporaries of scoring one slice of pairs; a term of the
# shard's vocabulary costs a Python str, a dict slot and its sorted key
LEX_PAIR_BYTES = 48
LEX_SLICE_BYTES = 48  # per pair of the slice being scored (sharding.lexical.SCORE_SLICE pairs at most)
LEX_SCORE_SLICE = 1 << 18  # = sharding.lexical.SCORE_SLICE (tests hold them equal)
LEX_TERM_BYTES = 200
LEX_TERMS_PER_ROW = 4  # a bound for a shard's vocabulary before it is counted (Heaps' law gives far fewer at scale)
LEX_MIN_TERMS = 50_000


def lexical_stats_task_bytes(rows: int, doc_row_bytes: int, batch_rows: int) -> tuple[int, str]:
    """Peak memory of a BM25 statistics task (the first pass) and the arithmetic behind it: it counts its shard
    ``batch_rows`` rows at a time (their texts and token lists, about 3 x the decoded row) into one count per term
    of the shard's vocabulary, bounded by ``LEX_TERMS_PER_ROW`` terms a row (at least ``LEX_MIN_TERMS``)."""
    terms = max(LEX_MIN_TERMS, LEX_TERMS_PER_ROW * rows)
    batch = 3 * min(batch_rows, rows) * doc_row_bytes
    total = TASK_BASE_BYTES + terms * LEX_TERM_BYTES + batch
    why = (f"{human_bytes(TASK_BASE_BYTES)} base + at most {terms:,} terms x {LEX_TERM_BYTES} B + 3 x "
           f"{min(batch_rows, rows):,} rows x {doc_row_bytes} B batch = {human_bytes(total)}")
    return total, why


def lexical_build_task_bytes(pairs: int, terms: int, rows: int, doc_row_bytes: int,
                             batch_rows: int) -> tuple[int, str]:
    """Peak memory of a BM25 shard task (the second pass) and the arithmetic behind it, from what the first pass
    counted of its shard: ``pairs`` (chunk, distinct term) pairs (the sum of the shard's document frequencies) at
    ``LEX_PAIR_BYTES`` each, ``terms`` terms at ``LEX_TERM_BYTES``, a batch of rows and the chunk ids."""
    batch = 3 * min(batch_rows, rows) * doc_row_bytes
    scoring = min(pairs, LEX_SCORE_SLICE) * LEX_SLICE_BYTES
    total = TASK_BASE_BYTES + pairs * LEX_PAIR_BYTES + scoring + terms * LEX_TERM_BYTES + batch + 8 * rows
    why = (f"{human_bytes(TASK_BASE_BYTES)} base + {pairs:,} (chunk, term) pairs x {LEX_PAIR_BYTES} B + "
           f"{human_bytes(scoring)} scoring + {terms:,} terms x {LEX_TERM_BYTES} B + 3 x {min(batch_rows, rows):,} "
           f"rows x {doc_row_bytes} B batch + ids = {human_bytes(total)}")
    return total, why


def shards_for_memory(kind: str, factory: str, nb: int, d: int, limit: int, *, doc_row_bytes: int,
                      part_row_bytes: int = 0, batch_rows: int = ADD_BATCH) -> int:
    """The fewest shards whose tasks each fit ``limit`` bytes (``shard_task_bytes``), at least 1; a RagtuneError
    when even a shard of one batch does not fit."""
    def need(n: int) -> int:
        return shard_task_bytes(kind, factory, n, d, doc_row_bytes=doc_row_bytes, part_row_bytes=part_row_bytes,
                                batch_rows=batch_rows)[0]

    if need(min(nb, batch_rows)) > limit:
        raise RagtuneError(f"a shard task of {min(nb, batch_rows):,} vectors already needs "
                           f"{human_bytes(need(min(nb, batch_rows)))} but a task may take {human_bytes(limit)} "
                           "(half of the smallest node's Ray memory). Fix: use nodes with more memory")
    shards = 1
    while need(math.ceil(nb / shards)) > limit:  # need() grows with the shard: at most a few doublings, then exact
        shards *= 2
    lo, hi = shards // 2 + 1, shards
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if need(math.ceil(nb / mid)) <= limit else (mid + 1, hi)
    return max(1, hi)
