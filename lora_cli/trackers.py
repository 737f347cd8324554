"""Experiment trackers (train.report_to): TensorBoard, MLflow and Weights & Biases receive what metrics.jsonl holds,
the resolved config as hyperparameters, and the generation samples as text.

One small class per tracker behind one interface (log_hparams, log_metrics, log_samples, close); `Trackers` fans
out to those a run asked for. Each tool is an optional extra of the same name (`pip install -e ".[mlflow]"`),
imported only when asked for; `check_installed` runs before anything loads, so a missing one costs no training.
Only rank 0 opens trackers (train.py). A resumed run continues the same tracking run: the run ids are kept in
out_dir/trackers.json, and TensorBoard appends to out_dir/tensorboard/, purging the steps after the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from lora_cli.config import RunConfig
from lora_cli.errors import ConfigError, TrainingError, first_line
from lora_cli.fsutil import atomic_write_text

RUNS_FILE = "trackers.json"  # in out_dir: each tracker's run id, for --resume
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl field -> tag (the step is the x axis)
TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss",
        "val_perplexity": "val/perplexity", "val_accuracy": "val/accuracy"}


def check_installed(names: Sequence[str]) -> None:
    """One line naming the extras to install when a tracker's package is missing (all of them at once). Each
    tracker's package, extra and name are the same word (config.TRACKERS)."""
    missing = []
    for name in dict.fromkeys(names):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"train.report_to: {', '.join(missing)} {verb} not installed; "
                          f"pip install -e \".[{','.join(missing)}]\"")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's values under their tracker tags."""
    return {tag: float(record[key]) for key, tag in TAGS.items() if record.get(key) is not None}


def flat_config(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as flat `section.key` hyperparameters; lists, mappings and null as JSON text."""
    out = {}
    for key, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) and key != "model" else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            out[name] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    return out


def samples_markdown(samples: Sequence[dict]) -> str:
    """Samples as Markdown (TensorBoard renders text summaries as Markdown): code blocks keep newlines."""
    def block(text: str) -> str:  # indented four spaces: a Markdown code block
        return "    " + text.replace("\n", "\n    ")

    return "\n\n".join(f"**sample {i}**\n\n" + "\n\n".join(f"{key}:\n\n{block(s[key])}"
                                                           for key in ("prompt", "generated", "reference"))
                       for i, s in enumerate(samples, 1))


class Tracker:
    """The interface: one tracking run."""

    name = ""
    run_id: str | None = None  # kept in trackers.json, so a resumed run continues this one

    def log_hparams(self, config: dict) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, samples: Sequence[dict]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoard(Tracker):
    """torch.utils.tensorboard's SummaryWriter into out_dir/tensorboard/. A resume appends to the same folder with
    purge_step, so TensorBoard drops the events after the checkpoint that the resumed run logs again."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # optional extra: tensorboard

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge)

    def log_hparams(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        # written into this run's own folder (SummaryWriter.add_hparams would start a sub-run per call)
        for summary in hparams(config, {}):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def log_samples(self, step: int, samples: Sequence[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflow(Tracker):
    """An MLflow run in MLFLOW_TRACKING_URI, else a local file store out_dir/mlruns/; the experiment is
    MLFLOW_EXPERIMENT_NAME (default lora-cli). Samples are artifacts samples/step_NNNNNN.jsonl."""

    name = "mlflow"

    def __init__(self, out_dir: Path, run_name: str, run_id: str | None = None):
        from mlflow.tracking import MlflowClient  # optional extra: mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 refuses a file store unless told; a local folder in the run directory needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception:  # that run is gone (another tracking URI, a deleted store): start a new one
                run_id = None
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lora-cli")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id = run_id

    def log_hparams(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_samples(self, step: int, samples: Sequence[dict]) -> None:
        text = "".join(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)
        self.client.log_text(self.run_id, text, f"samples/step_{step:06d}.jsonl")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB(Tracker):
    """A Weights & Biases run (WANDB_PROJECT, default lora-cli; WANDB_MODE=offline and W&B's other environment
    variables apply) with its files in out_dir/wandb/. A resume continues the run by its id (resume="allow");
    W&B ignores steps it has seen, so steps logged after the checkpoint keep their first values."""

    name = "wandb"

    def __init__(self, out_dir: Path, run_name: str, run_id: str | None, config: dict | None):
        import wandb  # optional extra: wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lora-cli"), name=run_name,
                              id=run_id, resume="allow", dir=str(out_dir), config=config,
                              settings=wandb.Settings(console="off"))  # leave lora's own output alone
        self.run_id = self.run.id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, samples: Sequence[dict]) -> None:
        import wandb

        columns = ["step", "prompt", "generated", "reference"]
        table = wandb.Table(columns=columns, data=[[step, s["prompt"], s["generated"], s["reference"]] for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The run's trackers (none: every call does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log_record(self, record: dict) -> None:
        """A metrics.jsonl record, at its step."""
        values = scalars(record)
        if values:
            for t in self.trackers:
                t.log_metrics(record["step"], values)

    def log_samples(self, step: int, samples: Sequence[dict]) -> None:
        for t in self.trackers:
            t.log_samples(step, samples)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []  # once
        for t in trackers:
            t.close(failed)


def open_trackers(cfg: RunConfig, out_dir: Path, resume_step: int | None = None) -> Trackers:
    """Start (resume_step None) or continue the tracking runs of train.report_to; their ids go to trackers.json.
    The config is logged as hyperparameters by a new run only (MLflow refuses to change a logged parameter)."""
    path = out_dir / RUNS_FILE
    ids = {}
    if resume_step is not None and path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            ids = {}  # a damaged record: new tracking runs rather than no run
    run_name = cfg.train.run_name or Path(out_dir).name
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(cfg.train.report_to):
            try:
                if name == "tensorboard":
                    tracker = TensorBoard(out_dir, resume_step)
                elif name == "mlflow":
                    tracker = MLflow(out_dir, run_name, ids.get(name))
                else:
                    tracker = WandB(out_dir, run_name, ids.get(name), cfg.to_dict() if name not in ids else None)
            except Exception as exc:  # a tracker's own failure (no server, no login): one line, before training
                raise TrainingError(f"train.report_to: {name} could not start a run ({first_line(exc)}); check its "
                                    "settings (e.g. MLFLOW_TRACKING_URI, WANDB_MODE=offline) or leave it out") from exc
            opened.append(tracker)
            if resume_step is None or (name != "tensorboard" and tracker.run_id != ids.get(name)):  # a new run
                tracker.log_hparams(flat_config(cfg))
    except BaseException:
        Trackers(opened).close(failed=True)
        raise
    atomic_write_text(path, json.dumps({t.name: t.run_id for t in opened if t.run_id is not None}, indent=1) + "\n")
    return Trackers(opened)
