"""Schema of `ragtune compare`: base vs fine-tuned vs RAG vs RAFT on the same questions.

The compare job runs the other jobs (embed, index, finetune) and the serving app, so most sections here are the
other jobs' own sections; the job fills in their paths (all under ``output.path``) and run names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig
from configs.schema.embed import ChunkConfig, CorpusConfig, EmbedderConfig
from configs.schema.finetune import DeepSpeedConfig, LoraConfig, ModelConfig, ScalingConfig, TrainConfig
from configs.schema.index import LexicalConfig
from configs.schema.serve import GenerationDefaults, PromptConfig

System = Literal["base", "finetuned", "rag", "raft"]
SYSTEMS: tuple[System, ...] = ("base", "finetuned", "rag", "raft")


class QuestionsConfig(Section):
    """The questions with reference answers (JSONL: `question`, `answers`, optional `doc_id` and `id`)."""

    path: str = Field(description="JSONL of {question, answers[], doc_id?, id?}; local path",
                      json_schema_extra={"storage": "input"})
    finetune_fraction: float = Field(0.5, gt=0, lt=1, description="share of the questions whose facts the fine-tuned "
                                                                  "systems train on ('seen'); the rest are held out")
    max_eval: int | None = Field(200, ge=1, description="questions answered per split at most (seen, held-out, new)")
    seed: int = Field(0, description="seeds the split (a stable hash of each question) and the samples")


class UpdateConfig(Section):
    """New or changed documents that arrive after the systems are built, and the questions they answer."""

    corpus: str | None = Field(None, description="JSONL/Parquet of the new and changed documents (same ids = "
                                                 "changed); null = no update stage",
                               json_schema_extra={"storage": "input"})
    questions: str | None = Field(None, description="JSONL of the questions whose answer is in the update",
                                  json_schema_extra={"storage": "input"})

    @model_validator(mode="after")
    def _both(self) -> UpdateConfig:
        if (self.corpus is None) != (self.questions is None):
            raise ValueError("update.corpus and update.questions go together. Fix: give both, or neither")
        return self


class IndexOptions(Section):
    """How the RAG index is built (the rest of the index job's settings keep their defaults)."""

    kind: str = Field("auto", description="auto or a FAISS factory string")
    shards: int | None = Field(None, ge=1, description="index shards; null = from the size")
    lexical: LexicalConfig = Field(default_factory=LexicalConfig)


class FinetuneOptions(Section):
    """How the fine-tuned and RAFT systems train (the finetune job's sections)."""

    data: Literal["qa", "corpus", "both"] = Field("qa", description="fine-tuned: question/answer pairs of the seen "
                                                                     "questions, the corpus text, or both")
    max_length: int = Field(256, ge=8, description="tokens per training example")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)


class RaftConfig(Section):
    """RAFT training records: a seen question, retrieved passages, its answer."""

    gold_fraction: float = Field(0.8, ge=0, le=1, description="share of records whose passages include the gold one")
    distractors: int | None = Field(None, ge=0, le=20, description="hard distractors beside the gold passage (one "
                                    "more without it): the top retrieved passages of other documents, from the real "
                                    "index; null = retrieval.k - 1, so a record holds as many passages as a prompt")
    candidates: int = Field(10, ge=1, le=100, description="passages retrieved per question to draw distractors from")
    replay: str | None = Field(None, description="chat records (JSONL) mixed into RAFT's training, e.g. the data the "
                                                 "base model learned to read on, so that it does not forget how",
                               json_schema_extra={"storage": "input"})
    replay_ratio: float = Field(1.0, gt=0, le=100, description="replay records per RAFT record")
    train: TrainConfig | None = Field(None, description="RAFT's own training loop; null = finetune.train")


class RetrievalOptions(Section):
    """How RAG and RAFT retrieve (as the serving app does)."""

    k: int = Field(3, ge=1, le=50, description="passages put into the prompt")
    mode: Literal["auto", "dense", "lexical", "hybrid"] = Field("auto", description="auto = hybrid when the index "
                                                                                    "has a lexical part")


class AnswerOptions(Section):
    """How the systems are asked: through the serving app over HTTP, as users would."""

    concurrency: int = Field(8, ge=1, le=256, description="requests in flight at once")
    defaults: GenerationDefaults = Field(default_factory=lambda: GenerationDefaults(max_tokens=16))
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the serving app (127.0.0.1)")


class OutputConfig(Section):
    path: str = Field(description="folder for everything the comparison writes (embeddings, index, runs, report)",
                      json_schema_extra={"storage": "output"})


class CompareJobConfig(Section):
    """`ragtune compare -c FILE`."""

    corpus: CorpusConfig
    questions: QuestionsConfig
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    systems: list[System] = Field(default_factory=lambda: list(SYSTEMS), description="which systems to build and ask")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    embed: EmbedderConfig = Field(default_factory=EmbedderConfig)
    index: IndexOptions = Field(default_factory=IndexOptions)
    finetune: FinetuneOptions
    raft: RaftConfig = Field(default_factory=RaftConfig)
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    answer: AnswerOptions = Field(default_factory=AnswerOptions)
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _systems(self) -> CompareJobConfig:
        if not self.systems or len(set(self.systems)) != len(self.systems):
            raise ValueError(f"systems = {self.systems}: give each of {', '.join(SYSTEMS)} at most once, at least one")
        return self
