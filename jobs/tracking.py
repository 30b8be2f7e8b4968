"""Experiment tracking of `ragtune finetune`: TensorBoard event files always, MLflow and W&B when configured.

Every sink gets the same scalars under the same names, at the optimizer step (the x axis everywhere):

==================================  ===============================================  ===========================
scalar                              what                                             metrics.jsonl key
==================================  ===============================================  ===========================
``train/loss``                      mean loss per micro batch, all workers           ``loss``
``train/lr``                        the learning rate the step trained with          ``lr``
``train/tokens_per_s``              tokens (no padding) of the global batch per s    ``tokens_per_s``
``eval/loss``                       mean loss per answer token, validation set       ``eval_loss`` (eval steps)
``system/max_rss_mib``              largest worker's peak resident memory so far     ``max_rss_mib``
``system/rss_mib``                  largest worker's resident memory after the step  ``rss_mib``
``system/peak_above_baseline_mib``  largest worker's peak above its memory before    ``peak_above_baseline_mib``
                                    its model was built (the memory plan's figure)
==================================  ===============================================  ===========================

Memory scalars are in MiB.

- TensorBoard: ``<storage_path>/<run>/outputs/tensorboard/``, one event file per attempt (a worker restart or a
  rerun opens a new one); ``tensorboard --logdir <storage_path>`` shows every run of a storage path side by side.
- MLflow (``tracking.mlflow.uri``): one MLflow run per ragtune run, named ``run.name``, tagged with the run name
  and storage path (how a resumed run finds it again), its params the resolved config flattened
  (``train.lr``, ``lora.r``, ...).
- W&B (``tracking.wandb.project``): one W&B run per ragtune run, its id made from the run name and storage path,
  resumed with ``resume="allow"``; the config flattened as its config.

Who writes: rank 0 of the training workers, as each step ends. Not the driver through a Ray Train callback,
because the driver sees metrics only when they are reported, and the job reports only with a checkpoint (every
``train.checkpoint_every`` steps): a user following a 7B run in TensorBoard or MLflow wants every step as it
happens, and reporting every step through Ray Train would make every step a round trip to the controller. Rank 0
already holds every row (losses and memory are all-reduced over the workers before it sees them).

What that implies, and how it is handled:

- Object-store storage paths: TensorBoard writes a local file. With a local (or mounted) storage path the event
  file is written in place and TensorBoard sees every step as it is flushed (each step); with a URI it is written
  in a local folder and copied to the storage path at every checkpoint and at the end (``sync``).
- A worker restart (or a rerun) resumes from the latest checkpoint at step N and trains N+1... again: the steps
  the failed attempt logged after N are logged a second time. TensorBoard: the new attempt's event file starts
  with a ``purge_step`` of N+1, so TensorBoard drops the old attempt's values from N+1 on and shows each step
  once (the new attempt's value). MLflow and W&B cannot delete a logged value: the resumed attempt skips the steps
  that the run already has (a resumed run reproduces the uninterrupted run's losses, to within 1e-4 in the tests),
  so each step is there once too.
- Ranks other than 0 open no sink; a sink that fails to log (a tracking server down) raises: the run fails and
  Ray Train restarts it from its latest checkpoint like any other worker failure.

MLflow's file store (``tracking.mlflow.uri: file:///...``) is in maintenance mode upstream and refuses to open
unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a config that names a ``file:`` URI asks for it, so this module sets
it for that process. Credentials (``MLFLOW_TRACKING_TOKEN``, ``WANDB_API_KEY``, ...) come from the environment;
the job forwards every ``MLFLOW_*`` and ``WANDB_*`` variable of the driver to the workers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from configs.errors import RagtuneError
from sharding.storage import Location, atomic_write_bytes, makedirs

if TYPE_CHECKING:
    from configs.schema import FinetuneJobConfig

log = logging.getLogger("ragtune.tracking")

# metrics row key -> scalar name, in every sink (the module docstring's table)
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "eval_loss": "eval/loss",
    "max_rss_mib": "system/max_rss_mib",
    "rss_mib": "system/rss_mib",
    "peak_above_baseline_mib": "system/peak_above_baseline_mib",
}
# tags that find a ragtune run's MLflow run again
RUN_TAG, STORAGE_TAG = "ragtune.run", "ragtune.storage_path"
# how an attempt ends: the run finished, stopped by train.stop_after_steps (continued by a rerun), or raised
End = Literal["finished", "stopped", "failed"]
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
# distribution to install for each optional sink: (config field that turns it on, module, pip requirement)
PACKAGES = {
    "mlflow": ("tracking.mlflow.uri", "mlflow", "mlflow-skinny==3.17.2"),
    "wandb": ("tracking.wandb.project", "wandb", "wandb==0.31.0"),
}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row (``optimizer_step``'s, with ``eval_loss`` at eval steps) as the sinks' scalars."""
    return {name: float(row[key]) for key, name in SCALARS.items() if key in row}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys to strings (``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}``); lists
    and nulls as JSON."""
    flat: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v if isinstance(v, str) else json.dumps(v)
    return flat


def check(cfg: FinetuneJobConfig) -> None:
    """Before launch: every configured sink's package is installed (here, on the driver; the cluster's workers
    need it too: the same image)."""
    t = cfg.tracking
    for name, value in (("mlflow", t.mlflow.uri), ("wandb", t.wandb.project)):
        field, module, requirement = PACKAGES[name]
        if value and importlib.util.find_spec(module) is None:
            raise RagtuneError(f"{field} = {value!r} asks for {name}, but the `{module}` package is not installed. "
                               f"Fix: pip install '{requirement}' (on the driver and in the workers' image), or "
                               f"remove {field}")


class Sink(Protocol):
    """Where rank 0's scalars go."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def sync(self) -> None:
        """Make what was logged durable where users read it (a checkpoint was just written)."""

    def close(self, end: End) -> None: ...


class TensorBoardSink:
    """Event files in ``dest`` (a storage location): written in place when it is local, else in a local folder
    copied to ``dest`` by ``sync``. ``start_step``: the step the run resumes from (0 for a new run).

    It writes with tensorboardX's synchronous ``EventsWriter``: its ``SummaryWriter`` queues events for a thread,
    and its ``flush`` does not wait for that queue, so a checkpoint's copy could miss the last steps.
    """

    def __init__(self, dest: Location, start_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.dest = dest
        self._tmp = None if dest.is_local else tempfile.TemporaryDirectory(prefix="ragtune-tb-")
        self.local = Path(dest.path if self._tmp is None else self._tmp.name)
        if dest.is_local:
            makedirs(dest)
        # the name has the time in seconds and the host; TensorBoard reads a folder's files in name order, which must
        # be the attempts' order (the purge below relies on it): nanoseconds and the pid, for attempts a second apart
        self.writer = EventsWriter(str(self.local / "events"), f".{time.time_ns()}.{os.getpid()}")
        # purge: TensorBoard drops what earlier attempts logged from this step on (this attempt redoes it); at step
        # 1 too, for an attempt that died before its first checkpoint
        self.writer.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                      session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=name, simple_value=v) for name, v in values.items()])
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a step takes seconds or more: every step on disk (fsync'd) as it ends

    def sync(self) -> None:
        if self._tmp is not None:
            for f in sorted(self.local.glob("events.out.tfevents.*")):
                atomic_write_bytes(self.dest.join(f.name), f.read_bytes())

    def close(self, end: End) -> None:
        self.writer.close()
        self.sync()
        if self._tmp is not None:
            self._tmp.cleanup()


def _allow_file_store(uri: str) -> None:
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (a ``file:`` store opened even though it is in maintenance mode)."""
    from mlflow.tracking import MlflowClient

    _allow_file_store(uri)
    return MlflowClient(tracking_uri=uri)


def find_mlflow_run(client: Any, experiment_id: str, run_name: str, storage_path: str) -> Any | None:
    """The MLflow run of a ragtune run (by its tags: run name and storage path), the latest if several."""
    runs = client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{run_name}' and "
                                               f"tags.`{STORAGE_TAG}` = '{storage_path}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class MlflowSink:
    """The run's MLflow run in experiment ``tracking.mlflow.experiment``: created the first time, continued by
    every later attempt (found by its tags); steps it already has are not logged again."""

    def __init__(self, cfg: FinetuneJobConfig, storage_path: str):
        from mlflow.entities import Param, RunTag

        m = cfg.tracking.mlflow
        assert m.uri is not None
        self.client = mlflow_client(m.uri)
        experiment = self.client.get_experiment_by_name(m.experiment)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(m.experiment)
            except Exception:  # made meanwhile by another job: use it
                experiment = self.client.get_experiment_by_name(m.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        params = flatten(cfg.model_dump(mode="json"))
        run = find_mlflow_run(self.client, experiment_id, cfg.run.name, storage_path)
        self.last_step = 0
        if run is None:
            run = self.client.create_run(experiment_id, run_name=cfg.run.name,
                                         tags={RUN_TAG: cfg.run.name, STORAGE_TAG: storage_path})
            new_params, changed = params, {}
        else:
            self.last_step = max((x.step for x in self.client.get_metric_history(run.info.run_id, SCALARS["loss"])),
                                 default=0)
            self.client.update_run(run.info.run_id, status="RUNNING")
            old = run.data.params
            new_params = {k: v for k, v in params.items() if k not in old}
            # a param cannot change in MLflow; a resume that changes the config (train.steps raised) says so in
            # a tag
            changed = {f"ragtune.changed.{k}": f"{old[k]} -> {v}" for k, v in params.items()
                       if k in old and old[k] != v}
        self.run_id = run.info.run_id
        for chunk in _chunks([Param(k, v[:6000]) for k, v in new_params.items()], 100):
            self.client.log_batch(self.run_id, params=chunk)
        for tags in _chunks([RunTag(k, v[:5000]) for k, v in changed.items()], 100):
            self.client.log_batch(self.run_id, tags=tags)
        log.info("MLflow: run %s (%s) in experiment %s at %s%s", cfg.run.name, self.run_id, m.experiment, m.uri,
                 f", continued after step {self.last_step}" if self.last_step else "")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:  # logged by an earlier attempt (redone after a restart)
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def sync(self) -> None:
        pass  # every log_batch is a synchronous request

    def close(self, end: End) -> None:
        # stopped early: KILLED; failed: FAILED; either is RUNNING again once a restart or a rerun continues it
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[end])


def wandb_run_id(run_name: str, storage_path: str) -> str:
    """The W&B run id of a ragtune run: its name and a hash of its storage path (W&B ids allow letters, digits,
    ``-`` and ``_``), so a rerun or a restarted worker resumes it and two storage paths do not collide."""
    digest = hashlib.sha256(storage_path.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)[:55]}-{digest}"


class WandbSink:
    """The run's W&B run (``tracking.wandb``), resumed by id; steps it already has are not logged again (W&B
    would drop them with a warning)."""

    def __init__(self, cfg: FinetuneJobConfig, storage_path: str, local_dir: str):
        import wandb

        w = cfg.tracking.wandb
        self.wandb = wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, mode=w.mode, name=cfg.run.name,
                              id=wandb_run_id(cfg.run.name, storage_path), resume="allow", dir=local_dir,
                              config=flatten(cfg.model_dump(mode="json")),
                              settings=wandb.Settings(console="off"))
        self.next_step = int(self.run.step or 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self.next_step:
            return
        self.run.log(values, step=step)
        self.next_step = step + 1

    def sync(self) -> None:
        pass  # W&B streams in its own process

    def close(self, end: End) -> None:
        self.run.finish(exit_code=1 if end == "failed" else 0)


class Tracker:
    """Rank 0's sinks: TensorBoard always, MLflow and W&B when configured. ``log(row)`` every step, ``sync()`` at
    every checkpoint, ``close(end)`` at the end of the attempt."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def open(cls, cfg: FinetuneJobConfig, outputs: Location, storage_path: str, start_step: int) -> Tracker:
        """The sinks of ``cfg`` for a run writing to ``outputs`` (its ``.../outputs`` folder), resuming at
        ``start_step`` (0 for a new run)."""
        sinks: list[Sink] = [TensorBoardSink(outputs.join("tensorboard"), start_step)]
        if cfg.tracking.mlflow.uri:
            sinks.append(MlflowSink(cfg, storage_path))
        if cfg.tracking.wandb.project:
            local = outputs.path if outputs.is_local else tempfile.mkdtemp(prefix="ragtune-wandb-")
            if outputs.is_local:
                makedirs(outputs)
            sinks.append(WandbSink(cfg, storage_path, local))
        return cls(sinks)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        for s in self.sinks:
            s.log(int(row["step"]), values)

    def sync(self) -> None:
        for s in self.sinks:
            s.sync()

    def close(self, end: End) -> None:
        for s in self.sinks:
            s.close(end)
