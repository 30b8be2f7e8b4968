"""Schema of `ragtune serve`: the RAG app on Ray Serve behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
LOOPBACK = "127.0.0.1"


class IndexSource(Section):
    """The index to serve and how its versions are followed."""

    path: str = Field(description="index root written by `ragtune index` (follows LATEST) or one version folder",
                      json_schema_extra={"storage": "input"})
    verify: bool = Field(True, description="check every shard's sha256 before loading it (slower start)")
    mmap: bool = Field(True, description="memory-map local shards where the index kind allows (IO_FLAG_MMAP*)")
    params: dict[str, int] = Field(default_factory=dict,
                                   description="search parameters over the tuned ones, e.g. {nprobe: 64}")
    poll_interval_s: float | None = Field(
        10.0, gt=0, description="seconds between checks of LATEST for a new version; null = only POST /admin/reload")


class EmbedderConfig(Section):
    """The index's embedding model as a deployment (queries and /v1/embeddings)."""

    batching: bool = Field(True, description="dynamic batching of concurrent requests (serving.batching: the next "
                                             "batch is what queued while the last one ran)")
    max_batch_size: int = Field(32, ge=1, le=1024, description="queries embedded in one forward pass at most")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="how long an idle encoder waits for a batch "
                                                                       "to fill")
    replicas: int = Field(1, ge=1, description="replicas of the Embedder")
    num_cpus: float | None = Field(None, gt=0, description="Ray CPUs per replica; null = cluster.placement's choice")
    threads: int | None = Field(None, ge=1, description="torch threads per replica; null = the node's CPUs, at "
                                                        "most 4 (cluster.placement)")


class AutoscalingConfig(Section):
    """Serve autoscaling of each shard group (instead of a fixed replica count)."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(4, ge=1, description="replicas at most")
    target_ongoing_requests: float = Field(4, gt=0, description="requests per replica the autoscaler aims at")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})."
                             f" Fix: set max_replicas >= {self.min_replicas}")
        return self


class ShardsConfig(Section):
    """Where the index is searched: one fused replica type, or ShardSearcher deployments (one per shard group)."""

    layout: Literal["auto", "fused", "split"] = Field(
        "auto", description="fused = one replica type holds the query encoder, every shard, the BM25 shards and the "
                            "docstore (the Ingress calls it once per search); split = Embedder -> Retriever -> one "
                            "ShardSearcher per group; auto = fused when the whole index fits fused_memory_share of "
                            "the smallest node's memory (cluster.placement.plan_serving), else split")
    fused_in_ingress: bool | None = Field(
        None, description="fused: true = the Ingress replicas hold the index (a search crosses no deployment; a "
                          "replica lost mid-request takes its requests in flight with it, 500s from Serve's proxy); "
                          "false = IndexReplica replicas behind one light Ingress, called once per search and "
                          "retried on another replica when one dies, at one more hop; null = false when there are "
                          "2 or more replicas (replicas, or autoscaling's max_replicas), else true")
    fused_memory_share: float = Field(0.25, gt=0, le=1, description="auto: the share of the smallest node's memory "
                                                                    "one fused replica may hold (index, BM25, "
                                                                    "docstore and embedding model)")
    groups: int | None = Field(None, ge=1, description="shard groups (deployments); null = one per shard, "
                                                       "capped at 8")
    replicas: int = Field(1, ge=1, description="replicas of each group, or of the fused replica (ignored with "
                                               "autoscaling)")
    autoscaling: AutoscalingConfig | None = Field(None, description="autoscale each group (or the fused replica) "
                                                                    "instead of `replicas`")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto = shards onto a GPU when the replica "
                                                                      "has one and the index kind allows")
    num_cpus: float | None = Field(None, gt=0, description="Ray CPUs per replica; null = cluster.placement's choice")
    threads: int | None = Field(None, ge=1, description=(
        "FAISS threads per ShardSearcher replica (the fused layout's replicas: torch's too); null = 1 for a "
        "ShardSearcher, the node's CPUs (at most 4) for a fused replica (cluster.placement)"))
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve checks a replica (a dead one is "
                                                                "replaced after the next failed check)")


SearchMode = Literal["auto", "dense", "lexical", "hybrid"]


class FusionConfig(Section):
    """How hybrid search fuses the dense and the BM25 ranking (``sharding.search.Fusion``; the same defaults)."""

    method: Literal["weighted", "rrf"] = Field("weighted", description="weighted: min-max normalised scores "
                                                                      "(beat RRF on SQuAD, docs/index.md); rrf: "
                                                                      "reciprocal rank fusion")
    weight: float = Field(0.5, ge=0, le=1, description="weighted: the dense ranking's weight (BM25 gets 1 - weight)")
    rrf_k: float = Field(60.0, gt=0, description="rrf: the rank constant, score = sum 1 / (rrf_k + rank)")
    depth: int = Field(100, ge=1, description="candidates taken from each ranking before fusing (at least k); "
                                              "deeper costs more search and fusion time")


class RetrievalConfig(Section):
    """Retriever: search mode, fan-out, exact top-k merge (and fusion), docstore, filters."""

    k: int = Field(4, ge=1, description="passages put into a chat prompt by default")
    mode: SearchMode = Field("auto", description="dense (FAISS), lexical (BM25, no embedding), hybrid (both, "
                                                 "fused) or auto = hybrid when the index version has a lexical part, "
                                                 "else dense (decided per version, so a swap may change it)")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="hybrid: how the rankings are fused")
    filter_overfetch: int = Field(10, ge=1, le=1000, description="with a metadata filter, search k x this many "
                                                                 "candidates and keep the k that pass")
    filter_max_candidates: int = Field(10_000, ge=1, description="with a filter, when fewer than k candidates "
                                                                 "pass, search 4x more, up to this many")
    retries_s: float = Field(20.0, ge=0, description="how long a shard search is retried while a replica of its "
                                                     "group restarts (within the request timeout)")


class GenerationDefaults(Section):
    """Sampling defaults of a request that does not say."""

    max_tokens: int = Field(128, ge=1, description="new tokens when a request gives no max_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")


class VllmConfig(Section):
    """vLLM's engine settings (``generator.engine: vllm``, GPU nodes only; see docs/serving.md)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one Generator replica spans (tensor parallelism)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM may take")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt heads")
    max_lora_rank: int = Field(16, ge=1, description="the largest LoRA rank an adapter may have")
    enforce_eager: bool = Field(False, description="no CUDA graphs (slower; starts faster, less memory)")


class GeneratorConfig(Section):
    """The causal LM, its LoRA adapters, batching."""

    model: str = Field(description="base model: hub id in the local cache, local folder (e.g. a fine-tuning run's "
                                   "base_model/) or URI", json_schema_extra={"storage": "input"})
    name: str = Field("base", description="model name of the base in the API (`model` of a request, /v1/models)")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters by API model name: PEFT "
                                                                        "folders (a run's outputs/adapter/)")
    max_adapters_per_replica: int = Field(4, ge=1, description="adapters loaded at once per replica (LRU)")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    context: int | None = Field(None, ge=16, description="prompt + answer tokens at most; null = the model's "
                                                         "max_position_embeddings")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf = transformers (CPU or GPU); vllm = vLLM on GPU "
                                                            "nodes (install the vllm extra)")
    decoding: Literal["continuous", "static"] = Field(
        "continuous", description="hf: continuous = requests join the running batch at step boundaries and leave "
                                  "when done; static = one batch decoded to its end before the next starts")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    batching: bool = Field(True, description="batch concurrent generations into one decode loop")
    max_batch_size: int = Field(8, ge=1, le=256, description="sequences decoded together at most")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=1, description="how long a batch waits to fill")
    replicas: int = Field(1, ge=1, description="replicas of the Generator")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto = a GPU when the replica has one")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto = bf16 on GPU, "
                                                                                         "fp32 on CPU")
    num_cpus: float | None = Field(None, gt=0, description="Ray CPUs per replica; null = cluster.placement's choice")
    threads: int | None = Field(None, ge=1, description="torch threads per replica; null = the node's CPUs, at "
                                                        "most 4 (cluster.placement)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} is not usable in the API. Fix: letters, digits and . _ : - only")
        return v

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [n for n in v if not _NAME.match(n)]
        if bad:
            raise ValueError(f"adapter names {bad} are not usable in the API. Fix: letters, digits and . _ : - only")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> GeneratorConfig:
        if self.name in self.adapters:
            raise ValueError(f"generator.name {self.name!r} is also an adapter name. Fix: give the base or the "
                             "adapter another name")
        return self

    @model_validator(mode="after")
    def _engine(self) -> GeneratorConfig:
        if self.engine == "vllm" and self.device == "cpu":
            raise ValueError("generator.engine = 'vllm' with generator.device = 'cpu': vLLM runs only on GPUs. "
                             "Fix: set generator.device to gpu (or auto), or generator.engine to hf")
        if self.engine == "hf" and self.vllm.tensor_parallel_size > 1:
            raise ValueError(f"generator.vllm.tensor_parallel_size = {self.vllm.tensor_parallel_size} but "
                             "generator.engine = 'hf' (one device per replica). Fix: set generator.engine to vllm, "
                             "or tensor_parallel_size to 1")
        return self

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one Generator replica spans when it is on GPUs (vllm: tensor_parallel_size, on one node)."""
        return self.vllm.tensor_parallel_size if self.engine == "vllm" else 1

    @property
    def placement_device(self) -> Literal["auto", "cpu", "gpu"]:
        """The device to plan the Generator on: vllm always needs GPUs (a plan without any is refused)."""
        return "gpu" if self.engine == "vllm" else self.device


class PromptConfig(Section):
    """How passages and the question become the prompt (then the tokenizer's chat template applies)."""

    system: str = Field(
        "Answer the question using the passages below. Cite passages by their number, like [1]. "
        "If the passages do not contain the answer, say so.",
        description="system message put first when the request has none; empty = none")
    passage: str = Field("[{n}] {title}\n{text}", description="one passage; fields {n} {title} {text} {doc_id} "
                                                              "{score}")
    context: str = Field("Passages:\n{passages}\n\nQuestion: {question}",
                         description="the last user message with retrieval; fields {passages} {question}")
    separator: str = Field("\n\n", description="between passages")
    min_passage_tokens: int = Field(32, ge=1, description="a passage cut shorter than this to fit the context is "
                                                          "dropped instead")

    @model_validator(mode="after")
    def _fields(self) -> PromptConfig:
        for name, text, known in (("passage", self.passage, {"n", "title", "text", "doc_id", "score"}),
                                  ("context", self.context, {"passages", "question"})):
            used = set(re.findall(r"{(\w*)[^}]*}", text))
            if used - known:
                raise ValueError(f"prompt.{name} uses unknown fields {sorted(used - known)}. Fix: use only "
                                 f"{', '.join('{' + k + '}' for k in sorted(known))}")
        if "{passages}" not in self.context or "{question}" not in self.context:
            raise ValueError("prompt.context must contain {passages} and {question}. Fix: e.g. "
                             "'Passages:\\n{passages}\\n\\nQuestion: {question}'")
        return self


class HttpConfig(Section):
    """Where the API listens."""

    host: str | None = Field(None, description="bind address; null = 127.0.0.1 (0.0.0.0 needs API keys)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy")
    route_prefix: str = Field("/", description="path the app is mounted at")
    app_name: str = Field("ragtune", description="Serve application name")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix {v!r} must start with '/'. Fix: e.g. / or /rag")
        return v


class AuthConfig(Section):
    """API keys (bearer tokens). None at all = the local-only default: bound to 127.0.0.1, no auth."""

    api_keys: list[str] = Field(default_factory=list, description="accepted keys (prefer api_keys_env: a key in "
                                                                  "a config file ends up in logs and repos)")
    api_keys_env: str | None = Field("RAGTUNE_API_KEYS", description="environment variable with comma-separated "
                                                                     "keys, read where the app starts")

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        short = [k[:4] + "..." for k in v if len(k) < 16]
        if short:
            raise ValueError(f"API keys {short} are shorter than 16 characters. Fix: use long random keys, e.g. "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return v


class LimitsConfig(Section):
    """Request limits: over a limit is a 4xx in OpenAI's error format, never a 500."""

    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size")
    max_json_depth: int = Field(32, ge=4, le=256, description="how deeply a body's arrays and objects may nest "
                                                              "(checked before parsing; OpenAI's bodies nest 5 deep)")
    max_messages: int = Field(64, ge=1, description="messages per chat request")
    max_input_chars: int = Field(32_000, ge=1, description="characters of all messages / a prompt / an input")
    max_tokens: int = Field(1024, ge=1, description="max_tokens a request may ask for")
    max_k: int = Field(50, ge=1, description="passages a request may ask for (k)")
    max_depth: int = Field(1000, ge=1, description="hybrid: candidates per ranking a request may ask for "
                                                   "(fusion.depth)")
    max_embedding_inputs: int = Field(256, ge=1, description="inputs per /v1/embeddings request")
    max_stop: int = Field(4, ge=0, description="stop sequences per request")
    request_timeout_s: float = Field(60.0, gt=0, description="a request (a whole stream) is cut after this")
    max_concurrent_requests: int = Field(256, ge=1, le=100_000, description=(
        "requests one Ingress replica answers at once (a stream until its end); one more is a 429 with "
        "Retry-After at once, never an unbounded wait"))
    latency_target_share: float = Field(0.5, ge=0, le=1, description=(
        "a route's requests should finish within this share of request_timeout_s: when one takes longer because "
        "it waited in a queue, its Ingress replica admits fewer of that route at a time (one more is a 429 with "
        "Retry-After at once, not a 504 later) and more again as they speed up; the hf engine also refuses a "
        "request its queue would keep waiting longer than this share for a slot; 0 keeps only "
        "max_concurrent_requests"))
    compute_nice: int = Field(10, ge=0, le=19, description=(
        "CPU priority (Unix nice) of the replicas that compute: the Embedder, the index replicas and the "
        "Generator. On a node they share with Serve's proxy and the Ingress, those then answer first, so that "
        "under overload a request over the limits is refused at once instead of after the work it would wait "
        "behind; on a node of their own it changes nothing. 0 = the priority Ray gives them"))
    max_queued_generations: int = Field(64, ge=0, description=(
        "requests waiting for a Generator replica beyond those it is decoding (Serve's max_queued_requests); "
        "one more is a 503 with Retry-After"))


class ServeConfig(Section):
    """What the command does besides serving."""

    print_config: bool = Field(False, description="print the Serve config YAML (for a KubeRay RayService) and exit")
    access_log: bool = Field(True, description="Serve's access log line per request in every replica's log (off "
                                               "saves CPU at high request rates)")


class ServeJobConfig(Section):
    """`ragtune serve -c FILE`."""

    index: IndexSource
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    generator: GeneratorConfig
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _limits(self) -> ServeJobConfig:
        if self.generator.defaults.max_tokens > self.limits.max_tokens:
            raise ValueError(f"generator.defaults.max_tokens ({self.generator.defaults.max_tokens}) exceeds "
                             f"limits.max_tokens ({self.limits.max_tokens}). Fix: lower the default or raise the "
                             "limit")
        if self.retrieval.k > self.limits.max_k:
            raise ValueError(f"retrieval.k ({self.retrieval.k}) exceeds limits.max_k ({self.limits.max_k}). Fix: "
                             "lower retrieval.k or raise limits.max_k")
        if self.retrieval.fusion.depth > self.limits.max_depth:
            raise ValueError(f"retrieval.fusion.depth ({self.retrieval.fusion.depth}) exceeds limits.max_depth "
                             f"({self.limits.max_depth}). Fix: lower retrieval.fusion.depth or raise "
                             "limits.max_depth")
        if self.http.host is not None and not self.auth.api_keys and not self.auth.api_keys_env and \
                not is_loopback(self.http.host):
            raise ValueError(f"http.host = {self.http.host!r} exposes the API beyond this machine but no API keys "
                             "can be configured (auth.api_keys empty, auth.api_keys_env null). Fix: set "
                             "auth.api_keys_env (e.g. RAGTUNE_API_KEYS), or leave http.host null (127.0.0.1)")
        return self


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
