import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli, python
from lora_cli.config import load_config
from lora_cli.rundir import DATA_DIGEST
from lora_cli.train import build, lr_at, train, _epoch_batches

TINY_MODEL = "{name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 256, seed: 7}"


def write_config(tmp_path, extra_train="", lora="{r: 4, alpha: 8, dropout: 0.0}", data_extra="", model=TINY_MODEL):
    data = tmp_path / "train.json"
    if not data.exists():
        rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
                for w in ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light",
                          "north", "paper", "glass", "horse", "bread", "chair", "dream", "flame", "grape", "heart"]]
        data.write_text(json.dumps(rows))
    # extra_train ("  key: value" lines) replaces these defaults: a YAML mapping holds each key once
    train = {"lr": "1e-2", "batch_size": "4", "warmup_steps": "2", "log_every": "1", "eval_every": "4", "save_every": "4"}
    for line in extra_train.splitlines():
        key, _, value = line.strip().partition(":")
        train[key] = value.strip()
    train = "".join(f"  {k}: {v}\n" for k, v in train.items())
    path = tmp_path / "run.yaml"
    path.write_text(f"""\
model: {model}
out_dir: out
data:
  train: train.json
  val_split: 0.2
  max_length: 64
{data_extra}lora: {lora}
train:
{train}""")
    return path


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_is_pure_and_shaped():
    assert [round(lr_at(s, 10, 1.0, 2, "cosine"), 6) for s in range(4)] == [0.5, 1.0, 1.0, 0.961940]
    assert lr_at(9, 10, 1.0, 2, "cosine") == pytest.approx(0.0380602, abs=1e-6)
    assert lr_at(9, 10, 1.0, 0, "linear") == pytest.approx(0.1)
    assert lr_at(5, 10, 2.0, 0, "constant") == 2.0
    assert lr_at(9, 10, 1.0, 0, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.9)).item()))


def test_end_to_end_cli(tmp_path):
    cfg_path = write_config(tmp_path, "  epochs: 3\n")
    done = cli("train", str(cfg_path), "--quiet")
    assert done.rc == 0, done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "checkpoint", "config.yaml",
                                                     "loss.png", "metrics.jsonl"]
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.1
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert vals[-1] < vals[0]
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 4  # A and B of two c_attn layers
    # reloading the adapter onto the base reproduces the best validation loss exactly
    from lora_cli.adapter import attach_adapter, load_adapter
    from lora_cli.pretrained import load_model
    from lora_cli.data import collate
    from lora_cli.evaluation import evaluate_lm

    cfg = load_config(cfg_path)
    s = build(cfg)
    adapter = load_adapter(out / "adapter.safetensors")
    model = attach_adapter(load_model(cfg.model), adapter)
    from lora_cli.data import batch_indices

    order = batch_indices([len(e) for e in s.data.val], cfg.train.batch_size, 0, 0, shuffle=False)
    val = evaluate_lm(model, (collate([s.data.val[i] for i in idx]) for idx in order))
    best = min(vals)
    assert val["loss"] == best
    assert json.loads(meta["training"])["best_val_loss"] == best
    # the saved config names its paths relative to the run directory: it loads again from there, wherever it is
    text = (out / "config.yaml").read_text()
    assert "out_dir: .\n" in text and "train: ../train.json\n" in text
    saved = load_config(out / "config.yaml")
    assert (Path(saved.out_dir).resolve(), Path(saved.data.train).resolve()) == (out.resolve(), Path(cfg.data.train))
    moved = {"out_dir": saved.out_dir, "data": {**cfg.to_dict()["data"], "train": saved.data.train}}
    assert saved.to_dict() == {**cfg.to_dict(), **moved}


def test_refuses_existing_out_dir(tmp_path):
    cfg_path = write_config(tmp_path, "  max_steps: 2\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    done = cli("train", str(cfg_path), "--quiet")
    assert done.rc == 1
    assert done.stderr.strip() == (f"error: out_dir {tmp_path / 'out'} holds files no lora-cli run wrote (keep.txt); a "
                                   "run (and --overwrite, which replaces an earlier run) needs an empty or new out_dir")
    assert cli("train", str(cfg_path), "--quiet", "--overwrite").stderr == done.stderr  # nor does --overwrite delete it
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    assert cli("train", str(cfg_path), "--quiet").rc == 0  # an earlier run: refused, and replaced with --overwrite
    done = cli("train", str(cfg_path), "--quiet")
    assert done.rc == 1 and done.stderr.strip() == (f"error: out_dir {tmp_path / 'out'} is not empty; pass --resume "
                                                    "to continue that run or --overwrite to replace it")
    assert cli("train", str(cfg_path), "--quiet", "--overwrite").rc == 0


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    # the uninterrupted reference
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    # 3 epochs of 4 steps: the kill at step 4's checkpoint lands mid-run, 4 training steps before the next write
    ref_cfg = write_config(ref_dir, "  epochs: 3\n  max_steps: 12\n", lora="{r: 4, alpha: 8, dropout: 0.1}")
    assert cli("train", str(ref_cfg), "--quiet").rc == 0
    # the same run, SIGKILLed right after its first checkpoint, then resumed
    cfg = write_config(tmp_path, "  epochs: 3\n  max_steps: 12\n", lora="{r: 4, alpha: 8, dropout: 0.1}")
    proc = python("-m", "lora_cli", "train", cfg, "--quiet", popen=True, stdout=subprocess.DEVNULL)
    for line in proc.stderr:
        if line.startswith("checkpoint saved at step 4"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # killed mid-run, after step 4's validation and checkpoint: the best adapter so far is step 4's, whole, and
    # the checkpoint is step 4's, unfinished
    from lora_cli.adapter import load_adapter

    assert load_adapter(tmp_path / "out" / "adapter.safetensors").metadata["training"]["step"] == 4
    state = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=True)["state"]
    assert (state["step"], state["finished"]) == (4, False)
    # a dry run with --resume checks the checkpoint as the resume will, and says where it would continue
    dry = cli("train", str(cfg), "--dry-run", "--resume")
    assert dry.rc == 0 and dry.stdout.splitlines()[-1] == (
        f"--resume: would continue the run in {tmp_path / 'out'} from step 4 of 12")
    dry = cli("train", str(cfg), "--dry-run", "--resume", "--set", "train.max_steps=16")
    assert dry.rc == 1 and assert_one_line_error(*dry).startswith(
        f"error: --resume: checkpoint {tmp_path / 'out' / 'checkpoint' / 'state.pt'} was written with train.max_steps: "
        "12, this run has 16;")
    # the same checkpoint as an older lora-cli wrote it (no global_batch: its position counted micro-batches, one
    # per step here) resumes to the same adapter
    old = tmp_path.parent / f"{tmp_path.name}-old-format"
    shutil.copytree(tmp_path, old)
    payload = torch.load(old / "out" / "checkpoint" / "state.pt", weights_only=True)
    del payload["global_batch"], payload["batch_order"], payload["settings"][DATA_DIGEST]  # nor the data digest
    assert payload["state"]["batch_in_epoch"] == 4  # at the first epoch's end: the next is drawn whole
    torch.save(payload, old / "out" / "checkpoint" / "state.pt")
    done = cli("train", str(old / cfg.name), "--resume", "--quiet")
    assert done.rc == 0 and "warning" not in done.stderr
    resumed = cli("train", str(cfg), "--resume", "--quiet")
    assert resumed.rc == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    a = adapter_tensors(ref_dir / "out" / "adapter.safetensors")
    b = adapter_tensors(tmp_path / "out" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = adapter_tensors(old / "out" / "adapter.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    ref_losses = [m["loss"] for m in read_metrics(ref_dir / "out") if "loss" in m]
    got_losses = [m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert ref_losses == got_losses
    # a resume continues the same run: what decides the training is kept (how it logs may change)
    config_yaml = (tmp_path / "out" / "config.yaml").read_text()
    for change, was, now in (("train.max_steps=16", 12, 16), ("data.val_split=0.25", 0.2, 0.25)):
        again = cli("train", str(cfg), "--resume", "--quiet", "--set", change)
        assert again.rc == 1 and assert_one_line_error(*again) == (
            f"error: --resume: checkpoint {tmp_path / 'out' / 'checkpoint' / 'state.pt'} was written with "
            f"{change.split('=')[0]}: {was}, this run has {now}; a resume continues the same run: keep its settings "
            f"({tmp_path / 'out' / 'config.yaml'}) or start again with --overwrite")
    # the data too: a file edited under the same path (one target word here) is another run's data
    data = tmp_path / "train.json"
    original = data.read_text()
    data.write_text(original.replace('"apple apple apple"', '"apple apple pear"'))
    again = cli("train", str(cfg), "--resume", "--quiet")
    assert again.rc == 1 and assert_one_line_error(*again) == (
        f"error: --resume: the training data differs from what checkpoint {tmp_path / 'out' / 'checkpoint' / 'state.pt'} "
        "was trained on (a data file changed under the same path, or the tokenizer did); a resume continues the same "
        "run: restore the data, or start again with --overwrite")
    data.write_text(original)
    assert (tmp_path / "out" / "config.yaml").read_text() == config_yaml
    assert cli("train", str(cfg), "--resume", "--quiet", "--set", "train.log_every=3").rc == 0


def test_a_mid_epoch_checkpoint_of_another_batch_order_is_resumed_with_a_warning():
    from lora_cli.data import BATCH_ORDER
    from lora_cli.rundir import order_changed_note

    mid = {"epoch": 1, "batch_in_epoch": 3}
    assert order_changed_note({"state": mid}, 5) == (
        "warning: the checkpoint was written by an older lora-cli, whose batches came in another order; the rest of "
        "epoch 2 is drawn in this version's order, so some of its examples are seen twice and others not at all "
        "(later epochs are whole)")
    assert order_changed_note({"state": mid, "batch_order": BATCH_ORDER}, 5) is None
    for done in (0, 5):  # at an epoch's start or end: no epoch is drawn in two orders
        assert order_changed_note({"state": {"epoch": 1, "batch_in_epoch": done}}, 5) is None


def test_sigint_saves_checkpoint_and_exits_130(tmp_path):
    cfg = write_config(tmp_path, "  max_steps: 400\n  save_every: 2\n")
    proc = python("-m", "lora_cli", "train", cfg, "--quiet", popen=True, stdout=subprocess.DEVNULL)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("checkpoint saved at step 2"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait()
    assert proc.returncode == 130
    last = rest.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step ")
    assert last.endswith(f"; continue with `lora train {tmp_path / 'out' / 'config.yaml'} --resume`")
    state = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=True)
    assert state["state"]["step"] == int(last.split("at step ")[1].split(";")[0])
    resumed = cli("train", tmp_path / "out" / "config.yaml", "--resume", "--quiet", cwd=tmp_path.parent)
    assert resumed.rc == 0 and f"resumed from step {last.split('at step ')[1].split(';')[0]}" in resumed.stderr


def hf_batch(examples):
    """What a transformers user feeds: full ids padded right, labels -100 on prompt and padding."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), 50256)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(e.ids, e.loss_mask)])
        mask[row, :n] = 1
    return ids, labels, mask


def test_loss_curve_matches_transformers_peft(tmp_path):
    """20 steps of our trainer == a plain loop over transformers + peft with the same weights and batches."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from lora_cli.pretrained import hf_state_dict
    cfg_path = write_config(tmp_path, "  max_steps: 20\n  epochs: 4\n  eval_every: 0\n  weight_decay: 0.01\n  max_grad_norm: 0.5\n",
                            data_extra="  val_split: 0.0\n")
    text = cfg_path.read_text().replace("  val_split: 0.2\n", "")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    result = train(cfg, log=lambda m: None, progress=False)
    ours = [m["loss"] for m in result.history if "loss" in m]
    assert len(ours) == 20

    s = build(cfg)  # the same start: base weights, LoRA A init, data
    c = s.model.config
    hf = GPT2LMHeadModel(HFConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    base_state = {k.replace(".base_layer", ""): v for k, v in s.model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(hf_state_dict(base_state), strict=False)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                                                   fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                ours_name = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(dict(s.model.named_parameters())[ours_name])
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    t = cfg.train
    peer = []
    step = 0
    for epoch in range(10):
        for idx in _epoch_batches(s, epoch):
            if step == 20:
                break
            ids, labels, mask = hf_batch([s.data.train[i] for i in idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, 20, t.lr, t.warmup_steps, t.lr_schedule)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            opt.zero_grad()
            peer.append(loss.item())
            step += 1
    assert len(peer) == 20
    for a, b in zip(ours, peer):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert ours[-1] < ours[0]


def test_a_run_capped_mid_epoch_says_so_and_logs_fractional_epochs(tmp_path):
    cfg = write_config(tmp_path, "  max_steps: 3\n")  # 16 training examples, batch 4: 4 steps an epoch
    dry = cli("train", str(cfg), "--dry-run")
    assert "steps: 3 (4 per epoch x 1 epochs, capped by max_steps)" in dry.stdout
    uncapped = cli("train", str(cfg), "--dry-run", "--set", "train.max_steps=100")
    assert "steps: 4 (4 per epoch x 1 epochs); batch" in uncapped.stdout
    assert cli("train", str(cfg), "--quiet").rc == 0
    last_two = read_metrics(tmp_path / "out")[-2:]
    assert [(m["step"], m["epoch"]) for m in last_two] == [(3, 0.75), (3, 0.75)] and "val_loss" in last_two[1]


def test_overwrite_never_deletes_or_replaces_the_runs_own_inputs(tmp_path):
    """--overwrite removes the earlier run's files (rundir.RUN_FILES): refused, before anything is written, where
    one of them is what this run reads (a data.test named test.jsonl, a hand-written config.yaml in out_dir); a run
    started again from the config.yaml a run saved is no such input, with --set changes too."""
    cfg = write_config(tmp_path, "  max_steps: 2\n")
    out = tmp_path / "out"
    assert cli("train", str(cfg), "--quiet").rc == 0
    (out / "test.jsonl").write_text('{"instruction": "Repeat the word sun.", "input": "", "output": "sun sun sun"}\n')
    before = sorted(p.name for p in out.iterdir())
    done = cli("train", str(cfg), "--quiet", "--overwrite", "--set", "data.test=out/test.jsonl")
    assert assert_one_line_error(*done) == (f"error: --overwrite would delete or replace {out / 'test.jsonl'}, which "
                                            f"this run reads as data.test; move it out of out_dir {out}, or choose "
                                            f"another out_dir")
    assert sorted(p.name for p in out.iterdir()) == before
    assert cli("train", str(out / "config.yaml"), "--quiet", "--overwrite", "--set", "train.max_steps=3").rc == 0
    assert "max_steps: 3" in (out / "config.yaml").read_text()
    mine = out / "config.yaml"
    mine.write_text("# mine\n" + mine.read_text())
    done = cli("train", str(mine), "--quiet", "--overwrite")
    assert assert_one_line_error(*done) == (f"error: --overwrite would delete or replace {mine}, which this run "
                                            f"reads as its config; move it out of out_dir {out}, or choose another "
                                            f"out_dir")
    assert mine.read_text().startswith("# mine\n")


def test_a_stop_signal_while_the_run_finishes_lets_it_finish(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) after the last step, while the final validation runs and the adapter, checkpoint and plot
    are written, waits for them: it killed the run there, leaving neither the adapter nor a checkpoint of the steps
    since the last one. Here the signal arrives from inside the final writes."""
    import os

    import lora_cli.train as train_module

    real_plot = train_module.plot_losses

    def plot_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, between the checkpoint and the plot
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(train_module, "plot_losses", plot_then_signal)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_config(tmp_path, "  max_steps: 3\n  save_every: 0\n  eval_every: 0\n"))
    lines: list[str] = []
    result = train(cfg, log=lines.append, progress=False)
    assert lines[-1] == "a stop signal came while the run was finishing; it finished first (exit code 0)"
    out = tmp_path / "out"
    assert result.state.step == 3 and (out / "adapter.safetensors").is_file() and (out / "loss.png").is_file()
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["state"]["finished"] is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_samples_budget_the_context_cannot_hold_is_refused_before_training(tmp_path):
    """train.samples decodes up to train.sample_max_new_tokens after each validation: a budget that fills the
    context stopped the run at its first validation, naming a --max-new-tokens flag train has not."""
    cfg = write_config(tmp_path, "  samples: 1\n  sample_max_new_tokens: 256\n")
    line = assert_one_line_error(*cli("train", str(cfg), "-q"), expected_code=2)
    assert line == (f"error: {cfg}: train.sample_max_new_tokens: 256 leaves no room for a prompt in the model's "
                    "context of 256 tokens; set it below 256")
    assert not (tmp_path / "out").exists()
