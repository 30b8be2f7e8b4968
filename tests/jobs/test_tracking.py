"""Experiment tracking sinks (jobs/tracking.py), without Ray: TensorBoard event files read back with TensorBoard's
own reader, MLflow read back from a local file store with MlflowClient, W&B by the calls it receives."""

import importlib.util
import sys
import types

import pyarrow.fs as pafs
import pytest

from configs.errors import RagtuneError
from configs.schema import FinetuneJobConfig, load_config
from jobs import tracking
from jobs.finetune import check as finetune_check
from sharding.storage import resolve
from tests.conftest import REPO

TINY = REPO / "configs" / "finetune" / "tiny.yaml"
STORAGE = "/runs/finetune"  # the storage path the sinks are told (their tags and ids), not written to


def cfg(*overrides) -> FinetuneJobConfig:
    return load_config(FinetuneJobConfig, TINY, overrides)


def row(step: int, loss: float, eval_every: int = 4) -> dict:
    """A metrics row as optimizer_step makes it (and train adds eval_loss at eval steps)."""
    r = {"step": step, "loss": loss, "lr": 1e-3 * step, "tokens_per_s": 100.0 + step, "max_rss_mib": 900.0 + step,
         "rss_mib": 800.0 + step, "baseline_rss_mib": 700.0, "peak_above_baseline_mib": 200.0 + step,
         "time": 1.7e9 + step}
    if step % eval_every == 0:
        r["eval_loss"] = loss + 0.5
    return r


def read_tensorboard(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``logdir`` as TensorBoard shows it: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every value
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_metrics_key_has_one_scalar_name():
    r = row(8, 2.0)
    assert tracking.scalars(r) == {"train/loss": 2.0, "train/lr": 8e-3, "train/tokens_per_s": 108.0,
                                   "eval/loss": 2.5, "system/max_rss_mib": 908.0, "system/rss_mib": 808.0,
                                   "system/peak_above_baseline_mib": 208.0}
    assert "eval/loss" not in tracking.scalars(row(7, 2.0))  # only at eval steps


def test_config_is_flattened_to_dotted_keys():
    flat = tracking.flatten(cfg("train.lr=0.01", "tracking.mlflow.uri=http://mlflow:5000").model_dump(mode="json"))
    assert flat["train.lr"] == "0.01" and flat["model.tiny.layers"] == "2"
    assert flat["tracking.mlflow.uri"] == "http://mlflow:5000" and flat["tracking.wandb.project"] == "null"
    assert flat["lora.target_modules"].startswith('["')  # lists as JSON


def test_tensorboard_has_every_step_once_after_a_resume(tmp_path):
    dest = resolve(str(tmp_path / "outputs" / "tensorboard"))
    first = tracking.TensorBoardSink(dest, start_step=0)
    for step in range(1, 11):  # the first attempt dies after step 10; its last checkpoint was step 6
        first.log(step, tracking.scalars(row(step, 10.0 - step)))
    first.close("stopped")
    second = tracking.TensorBoardSink(dest, start_step=6)  # resumed at 6: steps 7..10 are redone
    for step in range(7, 13):
        second.log(step, tracking.scalars(row(step, 100.0 + step)))
    second.close("finished")

    assert len(list((tmp_path / "outputs" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt
    got = read_tensorboard(tmp_path / "outputs" / "tensorboard")
    assert set(got) == set(tracking.SCALARS.values())
    assert got["train/loss"] == [(s, pytest.approx(10.0 - s)) for s in range(1, 7)] + \
        [(s, pytest.approx(100.0 + s)) for s in range(7, 13)]
    assert got["eval/loss"] == [(4, pytest.approx(6.5)), (8, pytest.approx(108.5)), (12, pytest.approx(112.5))]
    assert [s for s, _ in got["system/max_rss_mib"]] == list(range(1, 13))


def test_tensorboard_drops_an_attempt_that_died_before_its_first_checkpoint(tmp_path):
    dest = resolve(str(tmp_path / "tensorboard"))
    for attempt, last in ((1, 3), (2, 5)):  # the first dies at step 3; the restart begins again at step 0
        sink = tracking.TensorBoardSink(dest, start_step=0)
        for step in range(1, last + 1):
            sink.log(step, tracking.scalars(row(step, 10.0 * attempt + step)))
        sink.close("stopped")
    assert read_tensorboard(tmp_path / "tensorboard")["train/loss"] == [(s, 20.0 + s) for s in range(1, 6)]


def test_tensorboard_on_an_object_store_is_copied_at_every_sync(tmp_path):
    dest = resolve("memory://ragtune-tests/run/outputs/tensorboard")
    sink = tracking.TensorBoardSink(dest, start_step=0)
    for step in range(1, 5):
        sink.log(step, tracking.scalars(row(step, float(step))))
    sink.sync()  # a checkpoint: steps 1..4 are on the store
    at_checkpoint = {i.base_name: dest.fs.open_input_stream(i.path).read()
                     for i in dest.fs.get_file_info(pafs.FileSelector(dest.path))}
    for step in range(5, 7):
        sink.log(step, tracking.scalars(row(step, float(step))))
    sink.close("finished")
    local_dir = sink.local
    assert not local_dir.exists()  # the local copy is gone once closed

    for name, data in at_checkpoint.items():
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        (tmp_path / "ckpt" / name).write_bytes(data)
    assert [s for s, _ in read_tensorboard(tmp_path / "ckpt")["train/loss"]] == [1, 2, 3, 4]
    for name in at_checkpoint:
        (tmp_path / "end").mkdir(exist_ok=True)
        (tmp_path / "end" / name).write_bytes(dest.fs.open_input_stream(dest.join(name).path).read())
    assert [s for s, _ in read_tensorboard(tmp_path / "end")["train/loss"]] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_run_is_continued_after_a_resume_with_each_step_once(mlflow_store, tmp_path):
    c = cfg(f"tracking.mlflow.uri={mlflow_store}", "tracking.mlflow.experiment=tests", "run.name=r1")
    outputs = resolve(str(tmp_path / "r1" / "outputs"))
    first = tracking.Tracker.open(c, outputs, STORAGE, start_step=0)
    for step in range(1, 11):  # dies after step 10; its last checkpoint was step 6
        first.log(row(step, 10.0 - step))
    first.sync()
    # a rerun resumes at 6 with more steps: 7..10 are redone (not logged again), 11.. are new
    c2 = cfg(f"tracking.mlflow.uri={mlflow_store}", "tracking.mlflow.experiment=tests", "run.name=r1",
             "train.steps=60")
    second = tracking.Tracker.open(c2, outputs, STORAGE, start_step=6)
    for step in range(7, 13):
        second.log(row(step, 100.0 + step))
    second.close("finished")

    client = tracking.mlflow_client(mlflow_store)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # continued, not a second run
    r = runs[0]
    assert r.info.run_name == "r1" and r.info.status == "FINISHED"
    assert r.data.tags[tracking.RUN_TAG] == "r1" and r.data.tags[tracking.STORAGE_TAG] == STORAGE
    assert r.data.params["train.lr"] == str(c.train.lr) and r.data.params["train.steps"] == "40"
    assert r.data.tags["ragtune.changed.train.steps"] == "40 -> 60"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss"))
    assert loss == [(s, 10.0 - s) for s in range(1, 11)] + [(11, 111.0), (12, 112.0)]
    evals = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "eval/loss"))
    assert evals == [(4, 6.5), (8, 2.5), (12, 112.5)]
    assert set(r.data.metrics) == set(tracking.SCALARS.values())


def test_mlflow_runs_of_other_names_or_storage_paths_are_apart_and_end_with_their_status(mlflow_store, tmp_path):
    outputs = resolve(str(tmp_path / "outputs"))
    for name, storage, end in (("a", STORAGE, "stopped"), ("b", STORAGE, "failed"), ("a", "s3://other", "finished")):
        t = tracking.Tracker.open(cfg(f"tracking.mlflow.uri={mlflow_store}", f"run.name={name}"), outputs, storage,
                                  start_step=0)
        t.log(row(1, 1.0))
        t.close(end)
    client = tracking.mlflow_client(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("ragtune-finetune").experiment_id])
    assert sorted((r.info.run_name, r.data.tags[tracking.STORAGE_TAG], r.info.status) for r in runs) == [
        ("a", STORAGE, "KILLED"), ("a", "s3://other", "FINISHED"), ("b", STORAGE, "FAILED")]


class FakeWandb(types.ModuleType):
    """The calls the W&B sink makes, recorded (the `wandb` package is an optional extra, not installed in CI)."""

    def __init__(self, already_logged: int = 0):
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.already_logged = already_logged

    def Settings(self, **kw):  # noqa: N802 (wandb's name)
        return ("Settings", kw)

    def init(self, **kw):
        self.calls.append(("init", kw))
        fake = self

        class Run:
            step = fake.already_logged  # W&B: the next step of a resumed run

            def log(self, values, step):
                fake.calls.append(("log", step, values))

            def finish(self, exit_code):
                fake.calls.append(("finish", exit_code))

        return Run()


def test_wandb_run_is_resumed_by_its_id_and_skips_steps_it_has(tmp_path, monkeypatch):
    fake = FakeWandb(already_logged=9)  # the earlier attempt logged steps 1..8 (next step: 9)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    c = cfg("tracking.wandb.project=p", "tracking.wandb.mode=offline", "run.name=tiny.v2")
    outputs = resolve(str(tmp_path / "outputs"))
    t = tracking.Tracker.open(c, outputs, STORAGE, start_step=6)
    for step in range(7, 11):
        t.log(row(step, float(step)))
    t.close("finished")

    (_, init), *rest = fake.calls
    assert init["id"] == tracking.wandb_run_id("tiny.v2", STORAGE) and init["id"].startswith("tiny-v2-")
    assert init["resume"] == "allow" and init["name"] == "tiny.v2" and init["project"] == "p"
    assert init["mode"] == "offline" and init["dir"] == outputs.path
    assert init["config"]["train.steps"] == "40"
    assert rest == [("log", 9, tracking.scalars(row(9, 9.0))), ("log", 10, tracking.scalars(row(10, 10.0))),
                    ("finish", 0)]
    assert tracking.wandb_run_id("tiny.v2", "s3://other") != init["id"]


def read_wandb_history(path) -> tuple[list, list[dict]]:
    """The run records and the history rows (user keys only) of an offline W&B run file (``run-<id>.wandb``): a
    7-byte W&B header, then LevelDB's log format (32 KiB blocks; records of a 7-byte header -- crc32c, length,
    kind: 1 full, 2 first, 3 middle, 4 last -- and data, a ``wandb_internal_pb2.Record``)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos = path.read_bytes(), 32768, 7
    assert raw[:4] == b":W&B"
    datas, part = [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (length, kind) == (0, 0):  # a block's zero-filled tail
            pos += left
            continue
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            datas.append(part)
            part = b""
    runs, history = [], []
    for data in datas:
        r = pb.Record()
        r.ParseFromString(data)
        if r.WhichOneof("record_type") == "run":
            runs.append(r.run)
        elif r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"step": r.history.step.num})
    return runs, history


def test_wandb_offline_run_has_every_step_under_the_same_names(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `wandb` extra: not in CI's install
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = cfg("tracking.wandb.project=p", "tracking.wandb.mode=offline", "run.name=r1")
    outputs = resolve(str(tmp_path / "outputs"))
    t = tracking.Tracker.open(c, outputs, STORAGE, start_step=0)
    for step in range(1, 11):
        t.log(row(step, 10.0 - step))
    t.close("finished")

    (path,) = (tmp_path / "outputs" / "wandb").glob("offline-run-*/run-*.wandb")
    runs, history = read_wandb_history(path)
    assert runs[0].run_id == tracking.wandb_run_id("r1", STORAGE) and runs[0].display_name == "r1"
    assert [h["step"] for h in history] == list(range(1, 11))
    assert history == [tracking.scalars(row(s, 10.0 - s)) | {"step": s} for s in range(1, 11)]


def test_a_configured_sink_without_its_package_is_refused_before_launch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "wandb") else real(name, *a))
    tracking.check(cfg())  # nothing configured: TensorBoard only, nothing to check
    with pytest.raises(RagtuneError, match=r"tracking.mlflow.uri = 'http://mlflow:5000' asks for mlflow, but the "
                                           r"`mlflow` package is not installed. Fix: pip install "
                                           r"'mlflow-skinny==3.17.2'"):
        tracking.check(cfg("tracking.mlflow.uri=http://mlflow:5000"))
    with pytest.raises(RagtuneError, match=r"tracking.wandb.project = 'p' asks for wandb, .*Fix: pip install "
                                           r"'wandb==0.31.0'"):
        tracking.check(cfg("tracking.wandb.project=p"))
    with pytest.raises(RagtuneError, match=r"tracking.wandb.project = 'p' asks for wandb"):
        finetune_check(cfg("tracking.wandb.project=p"))  # the job's checks before launch include it


def test_tensorboard_files_open_in_tensorboard_cli_layout(tmp_path):
    """``tensorboard --logdir <storage_path>`` finds each run's event files under <run>/outputs/tensorboard."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    for name in ("run-a", "run-b"):
        sink = tracking.TensorBoardSink(resolve(str(tmp_path / name / "outputs" / "tensorboard")), start_step=0)
        sink.log(1, tracking.scalars(row(1, 1.0)))
        sink.close("finished")
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert sorted(mux.Runs()) == ["run-a/outputs/tensorboard", "run-b/outputs/tensorboard"]
