"""The fine-tuning job on a real local Ray: tiny model, 2 CPU workers, DeepSpeed ZeRO-0, 2, 3 and 3 with offload,
LoRA and full fine-tuning."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from configs.schema import FinetuneJobConfig, load_config
from jobs.finetune import run
from models.sft import encode_record
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

DATA = REPO / "configs" / "finetune" / "data" / "capitals.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The capitals file split in two: 104 records to learn, 16 held out for eval."""
    d = tmp_path_factory.mktemp("ftdata")
    lines = DATA.read_text().splitlines(keepends=True)
    (d / "train.jsonl").write_text("".join(lines[:104]))
    (d / "val.jsonl").write_text("".join(lines[104:]))
    return d


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("ftruns")


def cfg(data, storage, name, *overrides) -> FinetuneJobConfig:
    return load_config(FinetuneJobConfig, REPO / "configs" / "finetune" / "tiny.yaml", [
        f"data.train={data / 'train.jsonl'}", f"data.validation={data / 'val.jsonl'}", "train.steps=24",
        "train.eval_every=8", "train.checkpoint_every=8", f"run.storage_path={storage}", f"run.name={name}",
        *overrides])


def metrics(c: FinetuneJobConfig) -> list[dict]:
    path = Path(c.run.storage_path) / c.run.name / "outputs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def zero2(ray_2_cpus, data, storage):
    c = cfg(data, storage, "z2", "deepspeed.preset=zero2", f"tracking.mlflow.uri={(storage / 'mlruns').as_uri()}")
    return c, run(c)


@pytest.fixture(scope="module")
def zero3(ray_2_cpus, data, storage):
    c = cfg(data, storage, "z3", "deepspeed.preset=zero3")
    return c, run(c)


def latest_checkpoint(c: FinetuneJobConfig) -> Path:
    return max(p for p in (Path(c.run.storage_path) / c.run.name).glob("checkpoint_*") if p.is_dir())


def base_state(c: FinetuneJobConfig) -> dict:
    from models.generators import load_model

    return load_model(str(Path(c.run.storage_path) / c.run.name / "base_model")).state_dict()


def eval_loss_with_plain_peft(c: FinetuneJobConfig, data: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(c.run.storage_path) / c.run.name
    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                      run_dir / "outputs" / "adapter").eval()
    return eval_loss(model, tok, c, data)


def eval_loss(model, tok, c: FinetuneJobConfig, data: Path) -> float:
    """The mean loss per answer token of ``model`` on the held-out records, one at a time."""
    total, n_tok = 0.0, 0
    for line in (data / "val.jsonl").read_text().splitlines():
        ex = encode_record(tok, json.loads(line), c.data.max_length)
        labels = torch.tensor([ex.labels])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss) * n
        n_tok += n
    return total / n_tok


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_loss_falls_clearly(stage, request):
    c, summary = request.getfixturevalue(stage)
    m = metrics(c)
    assert [r["step"] for r in m] == list(range(1, 25)) and summary.finished
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    out = Path(summary.outputs)
    assert {p.name for p in out.iterdir()} >= {"adapter", "metrics.jsonl", "loss.png", "config.json", "summary.json"}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_only_adapter_weights_change(stage, request):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    c, _ = request.getfixturevalue(stage)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(latest_checkpoint(c)), tag="state")
    base = base_state(c)
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    frozen = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
              for k, v in trained.items() if "lora_" not in k}
    assert set(frozen) == set(base)
    for k, v in frozen.items():
        assert torch.equal(v, base[k]), f"base weight {k} has changed"
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_saved_adapter_loads_with_plain_peft_and_gives_the_reported_eval_loss(stage, request, data):
    c, summary = request.getfixturevalue(stage)
    assert eval_loss_with_plain_peft(c, data) == pytest.approx(summary.eval_loss, rel=1e-4)


# --- the other paths, cheaply: 6 steps each -----------------------------------------------------------------------
# ZeRO-0 (with packing, so packed blocks cross Ray Data to the workers), ZeRO-3 with optimizer offload, and full
# fine-tuning (every weight, under ZeRO-3: the save gathers every partition).

SHORT = ("train.steps=6", "train.warmup_steps=2", "train.eval_every=6", "train.checkpoint_every=6")


@pytest.fixture(scope="module")
def zero0(ray_2_cpus, data, storage):
    c = cfg(data, storage, "z0", "deepspeed.preset=zero0", "data.packing=true", *SHORT)
    return c, run(c)


@pytest.fixture(scope="module")
def zero3_offload(ray_2_cpus, data, storage):
    c = cfg(data, storage, "z3-offload", "deepspeed.preset=zero3-offload", *SHORT)
    return c, run(c)


@pytest.fixture(scope="module")
def full(ray_2_cpus, data, storage):
    c = cfg(data, storage, "full", "train.method=full", "deepspeed.preset=zero3", "train.lr=1e-3", *SHORT)
    return c, run(c)


def loss_falls(c: FinetuneJobConfig, summary) -> None:
    m = metrics(c)
    assert [r["step"] for r in m] == list(range(1, 7)) and summary.finished
    first, last = sum(r["loss"] for r in m[:2]) / 2, sum(r["loss"] for r in m[-2:]) / 2
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize("path", ["zero0", "zero3_offload"])
def test_zero0_and_zero3_offload_train_only_the_adapter(path, request, data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    c, summary = request.getfixturevalue(path)
    loss_falls(c, summary)
    if path == "zero0":  # no ZeRO partitions: DeepSpeed saves the whole module
        state = torch.load(latest_checkpoint(c) / "state" / "mp_rank_00_model_states.pt", weights_only=False)
        trained = state["module"]
    else:
        trained = get_fp32_state_dict_from_zero_checkpoint(str(latest_checkpoint(c)), tag="state")
    base = base_state(c)
    frozen = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
              for k, v in trained.items() if "lora_" not in k}
    assert set(frozen) == set(base) and all(torch.equal(v, base[k]) for k, v in frozen.items())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    assert eval_loss_with_plain_peft(c, data) == pytest.approx(summary.eval_loss, rel=1e-4)


def test_full_fine_tuning_changes_every_weight_and_saves_a_plain_transformers_model(full, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c, summary = full
    loss_falls(c, summary)
    model_dir = Path(summary.outputs) / "model"
    assert not (Path(summary.outputs) / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = base_state(c)
    trained = model.state_dict()
    assert set(trained) == set(base)
    changed = [k for k, v in trained.items() if not torch.equal(v, base[k])]
    assert set(changed) >= {k for k in base if k.endswith(("q_proj.weight", "down_proj.weight", "lm_head.weight"))}
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert eval_loss(model, tok, c, data) == pytest.approx(summary.eval_loss, rel=1e-4)


@pytest.mark.gpu
def test_qlora_trains_an_adapter_on_a_4bit_base_on_a_gpu(ray_2_cpus, data, storage):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    c = cfg(data, storage, "qlora", "model.quantization=4bit", "deepspeed.preset=zero2", "scaling.num_workers=1",
            *SHORT)
    summary = run(c)
    loss_falls(c, summary)
    run_dir = Path(c.run.storage_path) / c.run.name
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                        run_dir / "outputs" / "adapter")
    assert any(float(p.abs().sum()) > 0 for n, p in adapter.named_parameters() if "lora_B" in n)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(zero2, data, storage):
    ref = [r["loss"] for r in metrics(zero2[0])]
    stopped = run(cfg(data, storage, "z2-stop", "deepspeed.preset=zero2", "train.stop_after_steps=8"))
    assert not stopped.finished and stopped.steps == 8
    resumed = cfg(data, storage, "z2-stop", "deepspeed.preset=zero2")
    assert run(resumed).finished
    losses = [r["loss"] for r in metrics(resumed)]
    assert len(losses) == 24
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) < 1e-4


def worker_killer(at_step: int, record: Path):
    """A Ray Train callback that SIGKILLs one training worker's process, once: after the first checkpoint at or
    past ``at_step`` is reported, so the restart resumes from it and trains the next steps again. It writes to
    ``record`` (JSON) the step and the pid it killed, and the training workers' pids at every later report.

    The class is made here, so that Ray pickles it by value: the controller that runs it needs no import of
    this test module. The pids come from the GCS actor table (``ray.util.state`` needs the dashboard, which the
    test's Ray leaves out); the controller runs on this machine, so it kills with ``os.kill``.
    """
    from ray.train import UserCallback

    def training_workers() -> list[int]:
        import ray._private.state

        return sorted(a["Pid"] for a in ray._private.state.actors().values()
                      if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE")

    class WorkerKiller(UserCallback):
        def __init__(self):
            self.killed: dict | None = None

        def after_report(self, run_context, metrics, checkpoint):
            step = metrics[0]["step"]
            if self.killed is None:
                if checkpoint is None or step < at_step:
                    return
                workers = training_workers()
                self.killed = {"step": step, "pid": workers[-1], "workers": workers, "reports_after": []}
                os.kill(workers[-1], signal.SIGKILL)
            else:
                self.killed["reports_after"].append({"step": step, "workers": training_workers()})
            record.write_text(json.dumps(self.killed))

    return WorkerKiller()


@pytest.fixture(scope="module")
def crashed(zero2, data, storage, tmp_path_factory):
    """The zero2 run again, with one worker killed once the step-8 checkpoint is reported: (config, summary, what
    the killer recorded)."""
    c = cfg(data, storage, "z2-crash", "deepspeed.preset=zero2")
    record = tmp_path_factory.mktemp("killer") / "killed.json"
    summary = run(c, callbacks=[worker_killer(8, record)])
    return c, summary, json.loads(record.read_text())


def test_killed_worker_is_restarted_from_the_last_checkpoint(crashed, zero2):
    c, summary, killed = crashed
    # the worker did die: killed after the step-8 checkpoint, and a new worker group made the later reports
    assert killed["step"] == 8 and killed["pid"] in killed["workers"] and killed["reports_after"]
    assert all(killed["pid"] not in r["workers"] and len(r["workers"]) == 2 for r in killed["reports_after"])
    assert summary.finished
    losses = [r["loss"] for r in metrics(c)]
    ref = [r["loss"] for r in metrics(zero2[0])]
    assert len(losses) == 24  # the steps after 8 were redone from the step-8 checkpoint, not logged twice
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) < 1e-4


def test_finished_run_is_extended_by_more_steps(crashed, data, storage):
    c, _, _ = crashed
    before = metrics(c)
    more = cfg(data, storage, "z2-crash", "deepspeed.preset=zero2", "train.steps=32")
    assert run(more).finished
    after = metrics(more)
    assert [r["step"] for r in after] == list(range(1, 33)) and after[:24] == before


def tensorboard_scalars(c: FinetuneJobConfig) -> dict[str, list[tuple[int, float]]]:
    """The run's event files as TensorBoard shows them: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(c.run.storage_path) / c.run.name / "outputs" / "tensorboard"),
                           size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_mlflow_have_every_step_of_the_run(zero2, monkeypatch):
    from jobs.tracking import SCALARS, mlflow_client

    c, _ = zero2
    m = metrics(c)
    evals = [(r["step"], r["eval_loss"]) for r in m if "eval_loss" in r]
    assert [s for s, _ in evals] == [8, 16, 24]
    tb = tensorboard_scalars(c)
    assert set(tb) == set(SCALARS.values())
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in m]  # float32 in TB
    assert tb["eval/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in evals]
    assert [s for s, _ in tb["train/lr"]] == list(range(1, 25))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow_client(c.tracking.mlflow.uri)
    (r,) = client.search_runs([client.get_experiment_by_name(c.tracking.mlflow.experiment).experiment_id],
                              "attributes.run_name = 'z2'")
    assert r.info.status == "FINISHED" and r.data.params["deepspeed.preset"] == "zero2"
    history = sorted((x.step, x.value) for x in client.get_metric_history(r.info.run_id, "train/loss"))
    assert history == [(row["step"], pytest.approx(row["loss"], rel=1e-12)) for row in m]
    assert sorted((x.step, x.value) for x in client.get_metric_history(r.info.run_id, "eval/loss")) == evals


def test_tensorboard_of_a_restarted_run_has_each_step_once(crashed):
    c, _, killed = crashed
    m = metrics(c)  # 24 steps, or 32 once test_finished_run_is_extended_by_more_steps extended it
    event_files = list((Path(c.run.storage_path) / c.run.name / "outputs" / "tensorboard").glob("events.*"))
    assert len(event_files) >= 2  # the attempt killed after step 8 and the one restarted from it (and more)
    tb = tensorboard_scalars(c)
    # the killed attempt's steps after 8 were redone: TensorBoard shows each once, the redone value
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in m]
    assert [s for s, _ in tb["eval/loss"]] == [r["step"] for r in m if "eval_loss" in r]
