"""What the comparison measured, typed: built once by the compare job (``jobs.compare``), written as
``results.json``, read by its report (``jobs.compare_report``) and by the demo's claims (``jobs.demo``).

The JSON is these models' ``model_dump()``: field order is the file's key order, and a field marked ``Absent`` is
left out of the file when it is None (a measurement that was not made, e.g. recall for a closed-book system),
rather than written as null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


def _none(value: Any) -> bool:
    return value is None


# A measurement that not every run makes: absent from results.json when it was not made.
Absent = Field(None, exclude_if=_none)
# Wall seconds x the resources a stage held (or at most could use): the cost columns; only the kinds it had.
ResourceSeconds = Annotated[float | None, Absent]

Split = Literal["seen", "held_out", "before", "after"]


class SplitScore(BaseModel):
    """One system's answers to one set of questions."""

    n: int
    em: float  # SQuAD exact match, the mean over the questions
    f1: float  # SQuAD token F1, the mean
    errors: int  # requests that failed (scored as empty answers)
    latency_p50_s: float | None  # None: no answers
    latency_p95_s: float | None
    recall_at_k: float | None = Absent  # share of gold documents among the cited passages (retrieving systems)


class Latency(BaseModel):
    """Per answer over HTTP, both splits together."""

    p50_s: float | None
    p95_s: float | None


class Example(BaseModel):
    question: str
    answers: list[str]  # the reference answers
    said: str  # the system's answer


class Retrain(BaseModel):
    """The fine-tuned system's retraining on the seen and the new facts."""

    seconds: float
    records: int
    cpu_seconds: ResourceSeconds = None
    gpu_seconds: ResourceSeconds = None


class Update(BaseModel):
    """A system on the update's questions, before and after the new documents arrived."""

    before: SplitScore
    after: SplitScore  # the base learns nothing: its `after` is its `before`
    how: str | None = Absent  # how it learned: "index add + reload" or "retraining"
    time_to_knowledge_s: float | None = Absent  # from the update's arrival to its first answer from the new facts
    retrain: Retrain | None = Absent


class SystemResult(BaseModel):
    """One system (base, finetuned, rag, raft): its scores and the table's qualitative columns."""

    seen: SplitScore  # questions whose facts the fine-tuned systems trained on
    held_out: SplitScore  # questions about documents never trained on
    latency: Latency
    examples: list[Example]  # a few held-out answers
    update: Update | None = Absent  # when the run had an update stage
    data_needed: str
    cost_text: str  # compute to build
    maintenance: str

    def score(self, split: Split) -> SplitScore | None:
        """The scores on ``split``; ``before``/``after`` are the update's (None without an update stage)."""
        if split in ("before", "after"):
            return None if self.update is None else getattr(self.update, split)
        return getattr(self, split)


class IndexStage(BaseModel):
    """RAG's index: the embed job, then the index job."""

    seconds: float
    embed_s: float
    index_s: float
    docs: int
    chunks: int
    cpu_seconds: ResourceSeconds = None  # an upper bound: the whole cluster's CPUs (GPUs) x the wall seconds
    gpu_seconds: ResourceSeconds = None


class TrainStage(BaseModel):
    """A fine-tuning run (the finetune job): the fine-tuned system's or RAFT's."""

    seconds: float
    records: int
    replay: int | None = Absent  # RAFT: replay records mixed in
    with_gold: int | None = Absent  # RAFT: records whose prompt holds the gold passage
    loss_first: float | None
    loss_last: float | None
    cpu_seconds: ResourceSeconds = None  # the training workers' reserved CPUs (or GPUs) x the wall seconds
    gpu_seconds: ResourceSeconds = None


class IndexAddStage(BaseModel):
    """The update for RAG and RAFT: ``index add`` of the new documents and a reload of the serving app."""

    seconds: float
    add: dict[str, Any]  # the index add's summary (jobs.freshness.add), as it gives it
    reload: dict[str, Any]  # the serving app's answer to POST /admin/reload, as it gives it


class Stages(BaseModel):
    index: IndexStage
    finetuned: TrainStage | None = Absent
    raft: TrainStage | None = Absent
    index_add: IndexAddStage | None = Absent


class QuestionCounts(BaseModel):
    total: int
    seen: int
    held_out: int
    update: int  # the update's questions (0 without an update stage)


class CompareResults(BaseModel):
    """Everything one comparison measured (``<output.path>/results.json``)."""

    config: dict[str, Any]  # the resolved CompareJobConfig
    questions: QuestionCounts
    stages: Stages
    systems: dict[str, SystemResult]  # in the order of the config's `systems`
    seconds: float  # the whole job

    def to_json(self) -> str:
        # default=str: the index add's summary may hold values JSON has no type for (written as text)
        return json.dumps(self.model_dump(), indent=2, default=str)


def read_results(path: str | Path) -> CompareResults:
    """A comparison's ``results.json``."""
    return CompareResults.model_validate(json.loads(Path(path).read_text()))
