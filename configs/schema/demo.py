"""Schema of `ragtune demo`: the compare job on a fictional world, with a tiny base model taught to read first."""

from __future__ import annotations

from pydantic import Field, model_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig
from configs.schema.compare import AnswerOptions, FinetuneOptions, OutputConfig, RaftConfig, RetrievalOptions
from configs.schema.finetune import DeepSpeedConfig, ScalingConfig, TinyConfig, TrainConfig
from configs.schema.serve import PromptConfig


class WorldConfig(Section):
    """The world the systems are measured on (jobs/world.py), and its update."""

    seed: int = Field(0, description="one seed for the world, the update, the splits and the training")
    people: int = Field(60, ge=4, le=100_000, description="people (4 facts in 2 phrasings each: 8 questions)")
    orgs: int = Field(8, ge=2, description="organisations (2 questions each)")
    places: int = Field(10, ge=2, description="places (documents only)")
    changed: int = Field(6, ge=0, description="update: people who change employer (their document changes)")
    added: int = Field(6, ge=0, description="update: new people (new documents)")

    @model_validator(mode="after")
    def _fits(self) -> WorldConfig:
        if self.changed > self.people:
            raise ValueError(f"world.changed = {self.changed} is more than world.people = {self.people}. Fix: lower "
                             "it")
        return self


class ReaderConfig(Section):
    """Teaching the base to read: full fine-tuning of the tiny model (the finetune job) on questions about other
    people of the same world (never the measured ones), each asked with its gold passage in the serving app's
    prompt, several questions per passage."""

    people: int = Field(6000, ge=10, description="people to practise reading on (one record each)")
    questions_per_passage: int = Field(4, ge=1, le=4, description="questions asked about one passage (turns)")
    tiny: TinyConfig = Field(default_factory=lambda: TinyConfig(layers=2, hidden=64, heads=4, vocab=1024))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(method="full", steps=1200, lr=2e-3,
                                                                    warmup_steps=60, micro_batch=16,
                                                                    eval_every=200, checkpoint_every=200))
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    @model_validator(mode="after")
    def _full(self) -> ReaderConfig:
        if self.train.method != "full":
            raise ValueError("reader.train.method must be full: the tiny base is trained from scratch. Fix: "
                             "set it to full")
        return self


class SplitConfig(Section):
    finetune_fraction: float = Field(0.5, gt=0, lt=1, description="share of the people and organisations whose "
                                                                  "facts the fine-tuned systems train on")
    max_eval: int | None = Field(40, ge=1, description="questions answered per split at most")


class DemoJobConfig(Section):
    """`ragtune demo [-c FILE]`."""

    world: WorldConfig = Field(default_factory=WorldConfig)
    reader: ReaderConfig = Field(default_factory=ReaderConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    finetune: FinetuneOptions
    raft: RaftConfig = Field(default_factory=RaftConfig)
    raft_replay: bool = Field(True, description="mix the reader's practice records into RAFT's training (as many "
                                                "as raft.replay_ratio says), so that the tiny model keeps reading")
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    answer: AnswerOptions = Field(default_factory=AnswerOptions)
    output: OutputConfig = Field(default_factory=lambda: OutputConfig(path="runs/demo"))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
