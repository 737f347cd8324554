"""train.report_to (TensorBoard, MLflow, W&B) and train.samples: the trackers hold what metrics.jsonl holds, step by
step, across a Ctrl-C and --resume (the same tracking run continues); samples.jsonl holds N greedy generations per
validation, each what `lora generate` gives with the adapter of that step; and neither changes the trained adapter
by a single bit."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from helpers import alpaca_rows, child_env, cli, make_hf_gpt2
from lora_cli.config import load_config
from lora_cli.errors import ConfigError, TrainingError
from lora_cli.train import TrainingInterrupted, train

TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss",
        "val_perplexity": "val/perplexity"}
SAMPLES, NEW_TOKENS = 2, 12


def write_run(root: Path, base: Path, train_extra: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(alpaca_rows() * 2))
    # train_extra (", key: value, ...") replaces these defaults: a YAML mapping holds each key once
    train = {"lr": "2e-2", "batch_size": "4", "max_steps": "4", "warmup_steps": "1", "eval_every": "2", "save_every": "2",
             "log_every": "1"}
    for item in re.findall(r"(\w+): (\[[^\]]*\]|[^,]+)", train_extra):
        train[item[0]] = item[1].strip()
    config = root / "run.yaml"
    config.write_text(f"""\
model: {base}
out_dir: out
data: {{train: train.json, val_split: 0.25, max_length: 96}}
lora: {{r: 4, alpha: 8, dropout: 0.1, targets: [attn.c_attn]}}
train: {{{", ".join(f"{k}: {v}" for k, v in train.items())}}}
""")
    return config


def stop_at_step_2(message: str) -> None:
    """Ctrl-C right after the step-2 checkpoint: the run saves and stops (TrainingInterrupted), as a user's would."""
    if message == "checkpoint saved at step 2":
        signal.raise_signal(signal.SIGINT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate_with(adapter: Path, prompts: list[str], folder: Path) -> list[str]:
    """`lora generate` greedy on these prompts as they are (no template) with the (alpaca) adapter."""
    file = folder / "prompts.jsonl"
    file.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    done = cli("generate", "--adapter", adapter, "--no-template", "--json", "--file", file,
               "--max-new-tokens", NEW_TOKENS, "--device", "cpu")
    assert done.rc == 0, done.stderr
    return [json.loads(line)["generated"] for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: samples and TensorBoard + MLflow, stopped by Ctrl-C at step 2 and resumed; B: neither, straight through."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("trackers")
    base = root / "base"
    make_hf_gpt2(base)
    a = write_run(root / "a", base, f", samples: {SAMPLES}, sample_max_new_tokens: {NEW_TOKENS}, "
                                    "report_to: [tensorboard, mlflow], run_name: run-a")
    b = write_run(root / "b", base, "")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        with pytest.raises(TrainingInterrupted):
            train(load_config(a), log=stop_at_step_2, progress=False)
        out = a.parent / "out"
        first = {"ids": json.loads((out / "trackers.json").read_text()),
                 "generated": generate_with(out / "adapter.safetensors", [s["prompt"] for s in read_jsonl(
                     out / "samples.jsonl")], root)}  # the adapter of step 2, the only validation yet
        train(load_config(a), resume=True, log=lambda m: None, progress=False)
    train(load_config(b), log=lambda m: None, progress=False)
    return a.parent / "out", b.parent / "out", first


def expected(out: Path, tags=TAGS) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value)], in the order written."""
    series = {tag: [] for tag in tags.values()}
    for record in read_jsonl(out / "metrics.jsonl"):
        for key, tag in tags.items():
            if key in record:
                series[tag].append((record["step"], record[key]))
    return series


def test_samples_and_trackers_leave_training_bitwise_unchanged(runs):
    a, b, _ = runs
    adapter_a, adapter_b = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    assert all(adapter_a[k].equal(adapter_b[k]) for k in adapter_a)
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in read_jsonl(out / "metrics.jsonl")] for out in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 5  # steps 1-4, and the final validation at step 4


def test_samples_jsonl_equals_lora_generate_at_each_validation(runs, tmp_path):
    a, _, first = runs
    samples = read_jsonl(a / "samples.jsonl")
    assert [s["step"] for s in samples] == [2] * SAMPLES + [4] * SAMPLES
    assert all(set(s) == {"step", "prompt", "generated", "reference"} for s in samples)
    prompts = [s["prompt"] for s in samples[:SAMPLES]]
    assert [s["prompt"] for s in samples[SAMPLES:]] == prompts
    assert all(p.startswith("Below is an instruction") and p.endswith("### Response:\n") for p in prompts)
    assert all(s["reference"] in [" ".join([w] * 3) for w in alpaca_rows.__defaults__[0]] for s in samples)
    # step 2: compared after the Ctrl-C, when adapter.safetensors was step 2's; step 4: the best, hence the final one
    assert [s["generated"] for s in samples[:SAMPLES]] == first["generated"]
    val = [r["val_loss"] for r in read_jsonl(a / "metrics.jsonl") if "val_loss" in r]
    assert val[1] < val[0]  # so adapter.safetensors is step 4's
    assert [s["generated"] for s in samples[SAMPLES:]] == generate_with(a / "adapter.safetensors", prompts, tmp_path)
    assert any(s["generated"] for s in samples)  # something was generated


def test_tensorboard_scalars_equal_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, _, _ = runs
    events = EventAccumulator(str(a / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag, series in expected(a).items():
        assert series, tag
        # TensorBoard stores float32
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(s, float(np.float32(v))) for s, v in series], tag
    assert len(list((a / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resumed run appended a file
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [2, 4]
    first = read_jsonl(a / "samples.jsonl")[0]
    assert "    " + first["generated"].replace("\n", "\n    ") in texts[0].tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.lr"].number_value == 0.02 and hparams["lora.targets"].string_value == '["attn.c_attn"]'


def test_mlflow_metrics_equal_metrics_jsonl_in_one_run(runs):
    from mlflow.tracking import MlflowClient

    a, _, first = runs
    ids = json.loads((a / "trackers.json").read_text())
    assert ids == first["ids"]  # the resumed run continued the same MLflow run
    client = MlflowClient(tracking_uri=(a / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lora-cli")
    runs_found = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs_found] == [ids["mlflow"]]
    run = runs_found[0]
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.02" and run.data.params["train.samples"] == str(SAMPLES)
    for tag, series in expected(a).items():
        history = sorted(client.get_metric_history(ids["mlflow"], tag), key=lambda m: (m.step, m.timestamp))
        assert [(m.step, m.value) for m in history] == series, tag
    artifacts = [f.path for f in client.list_artifacts(ids["mlflow"], "samples")]
    assert artifacts == ["samples/step_000002.jsonl", "samples/step_000004.jsonl"]


def test_wandb_offline_writes_its_run_directory(tmp_path):
    pytest.importorskip("wandb")
    make_hf_gpt2(tmp_path / "base")
    config = write_run(tmp_path, tmp_path / "base", ", max_steps: 2, samples: 1, report_to: [wandb]")
    env = child_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_PROJECT="lora-cli-test",
                    WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                    WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    done = cli("train", config, "--quiet", env=env)
    assert done.rc == 0, done.stderr
    run_id = json.loads((tmp_path / "out" / "trackers.json").read_text())["wandb"]
    runs = list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob(f"run-{run_id}.wandb"))
    tables = list((runs[0] / "files" / "media" / "table").glob("samples_2_*.table.json"))  # samples at step 2
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    samples = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert table["columns"] == ["step", "prompt", "generated", "reference"]
    assert table["data"] == [[s["step"], s["prompt"], s["generated"], s["reference"]] for s in samples]
    assert done.stdout.strip().endswith("adapter.safetensors")  # W&B kept off lora's standard output


def test_missing_tracker_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    config = write_run(tmp_path, tmp_path / "base-never-loaded", ", report_to: [tensorboard, mlflow, wandb]")
    for module in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import mlflow` raises ImportError
    with pytest.raises(ConfigError) as err:
        train(load_config(config), log=lambda m: None, progress=False)
    assert str(err.value) == 'train.report_to: mlflow, wandb are not installed; pip install -e ".[mlflow,wandb]"'
    assert not (tmp_path / "out").exists()  # checked before anything loads or is written


def test_new_train_keys_are_validated_at_once():
    from lora_cli.config import build_config

    raw = {"model": "gpt2", "task": "classification", "data": {"train": "x.csv"},
           "train": {"report_to": ["tensorboard", "neptune"], "samples": 2, "sample_max_new_tokens": 0}}
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert str(err.value) == (
        "config: 3 problems: train.report_to: item 2: must be one of tensorboard, mlflow, wandb, got 'neptune'; "
        "train.samples: a classifier generates no text; set train.samples: 0; "
        "train.sample_max_new_tokens: must be >= 1, got 0")
    assert build_config({"model": "gpt2", "data": {"train": "x.csv"}, "train": {"report_to": "mlflow"}}
                        ).train.report_to == ["mlflow"]


def test_classifier_records_report_val_accuracy():
    from lora_cli.trackers import scalars

    assert scalars({"step": 3, "epoch": 1.0, "tokens": 90, "val_loss": 0.5, "val_accuracy": 0.75}) == {
        "val/loss": 0.5, "val/accuracy": 0.75}


def test_overwrite_removes_the_earlier_runs_samples_and_tensorboard_events(tmp_path):
    from lora_cli.rundir import clear_out_dir

    for name in ("samples.jsonl", "trackers.json", "tensorboard/events.out.tfevents.1.host", "mlruns/0/meta.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("earlier run")
    clear_out_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["mlruns", "mlruns/0", "mlruns/0/meta.yaml"]


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    make_hf_gpt2(tmp_path / "base")
    config = write_run(tmp_path, tmp_path / "base", ", report_to: [mlflow]")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nowhere://tracking")
    with pytest.raises(TrainingError) as err:
        train(load_config(config), log=lambda m: None, progress=False)
    message = str(err.value)
    assert message.startswith("train.report_to: mlflow could not start a run (") and "nowhere://tracking" in message
    assert message.endswith("; check its settings (e.g. MLFLOW_TRACKING_URI, WANDB_MODE=offline) or leave it out")
    assert "\n" not in message and not (tmp_path / "out" / "checkpoint").exists()  # no step was trained


def test_sample_prompt_is_the_tokens_before_the_first_target():
    from lora_cli.data import Example
    from lora_cli.samples import prompt_text, split_example
    from lora_cli.tokenizer import EOT_ID, GPT2

    prompt, response = GPT2.encode("Say hi:\n"), GPT2.encode(" hi there")
    masked = Example(prompt + response + [EOT_ID], [False] * len(prompt) + [True] * (len(response) + 1))
    assert split_example(masked) == (prompt, response)
    assert prompt_text(split_example(masked)[0]) == "Say hi:\n"
    text = Example(list(range(10, 20)), [False] + [True] * 9)  # format text / mask_prompt false: cut in half
    assert split_example(text) == (list(range(10, 15)), list(range(15, 20)))


def test_sample_prompt_of_a_bos_tokenizer_encodes_back_to_its_ids(tmp_path):
    from helpers import build_tokenizer
    from lora_cli.data import Example
    from lora_cli.samples import prompt_text, split_example
    from lora_cli.tokenizer import load_tokenizer

    special = build_tokenizer(tmp_path, bos=True)
    tok = load_tokenizer(tmp_path)
    prompt, response = tok.encode("def f(x):\n", add_special_tokens=True), tok.encode("    return x")
    assert prompt[0] == special["<|begin_of_text|>"]
    example = Example(prompt + response + [tok.eos_id], [False] * len(prompt) + [True] * (len(response) + 1))
    ids, reference = split_example(example, tok)
    assert (ids, reference) == (prompt, response)
    assert prompt_text(ids, tok) == "def f(x):\n" and tok.encode(prompt_text(ids, tok), add_special_tokens=True) == ids
