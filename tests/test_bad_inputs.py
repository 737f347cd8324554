"""Bad input never crashes: a table of broken configs, data files, checkpoints, adapters and flags, each run
through the real `lora` CLI in a child process.

Every row asserts: a non-zero exit code (2 for a bad config or flag, 1 for anything else, as README.md says),
stderr of one or two lines that names the offending file, key or row, no Python traceback, and that no file in
the inputs or the output locations was created, changed or removed (a snapshot of paths, sizes, mtimes and
SHA-256 before and after). Malicious pickles must be refused by weights_only loading without their payload
running (a marker file must not appear).

Speed: importing torch costs ~2 s of CPU per process, and this machine has two shared cores, so the rows run in
processes forked from one warm "zygote" (tests/zygote.py), each running `runpy.run_module("lora_cli")` exactly
as `python -m lora_cli` does. `test_zygote_matches_python_m` checks a few rows both ways; LORA_TEST_REAL_CLI=1
runs every row with `python -m lora_cli` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import helpers
from helpers import REAL_CLI, Evil, cli, cli_fresh, python, warm_zygote

MARKER = "PWNED"  # created by the malicious pickles' payload if it ever runs


def child_env(ws: Path, **extra) -> dict:
    return helpers.child_env(HF_HOME=str(ws / "hf-home"), **extra)


# ------------------------------------------------------------------------------------------ the workspace


def make_model(path: Path, seed: int = 0, **overrides) -> None:
    """A tiny random GPT-2 (full vocabulary, 128 positions) as a Hugging Face directory, written by our own
    save_pretrained (no transformers import: it costs seconds)."""
    from lora_cli.pretrained import save_pretrained
    from lora_cli.models import GPT2, GPT2Config

    model = GPT2(GPT2Config(**{"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, **overrides}))
    model.init_weights(torch.Generator().manual_seed(seed))
    save_pretrained(model, path)


def write_evil(path: Path, marker: Path) -> None:
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": Evil(marker)}, path)


def save_adapter_for(model_dir: Path, path: Path, r: int = 4, fill: float | None = None, seed: int = 0,
                     header_r: int | None = None, template: str | None = None, labels: list | None = None,
                     **meta) -> None:
    """An adapter as `lora train` writes it (metadata included) for the model in model_dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_cli.adapter import save_adapter
    from lora_cli.pretrained import load_model
    from lora_cli.config import LoraConfig
    from lora_cli.lora import apply_lora

    from lora_cli.models import add_classification_head

    base = load_model(str(model_dir))
    extra = {}
    if labels:  # a classifier: a trained head saved whole
        add_classification_head(base.model, len(labels), torch.Generator().manual_seed(seed))
        extra = {"modules_to_save": ["score"]}
    apply_lora(base.model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, **extra),
               generator=torch.Generator().manual_seed(seed))
    if fill is not None:
        with torch.no_grad():
            for name, p in base.model.named_parameters():
                if ".lora_" in name:
                    p.fill_(fill)
    metadata = {"base_model": base.describe(), "model_spec": str(model_dir),
                "task": "classification" if labels else "causal_lm",
                "data": {"format": "classification" if labels else "alpaca", "columns": {}, "prompt_template": template,
                         "mask_prompt": True, "max_length": 64, "labels": labels}}
    for key, value in meta.items():  # a damaged header: task=..., or data_max_length=... for data.max_length
        section, _, field = key.partition("_")
        if section == "data":
            metadata["data"][field] = value
        else:
            metadata[key] = value
    save_adapter(path, base.model, metadata)
    if header_r is not None:  # a header that disagrees with the tensors
        with safe_open(str(path), "pt") as f:
            header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        header["lora"] = json.dumps({**json.loads(header["lora"]), "r": header_r})
        save_file(tensors, str(path), metadata=header)


def peft_dir(path: Path, config: dict, tensors: dict | None = None, evil_marker: Path | None = None) -> None:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    if evil_marker is not None:
        write_evil(path / "adapter_model.bin", evil_marker)
    else:
        save_file(tensors, str(path / "adapter_model.safetensors"))


def alpaca_rows(n: int = 12) -> list[dict]:
    return helpers.alpaca_rows(helpers.WORDS[:n], repeat=2, with_input=False)


def fill_disk(mount: Path) -> None:
    """Fill a tmpfs until writes fail with ENOSPC."""
    fd = os.open(mount / "ballast", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs shared by the rows (read-only for them): models, adapters, PEFT dirs, data files."""
    ws = tmp_path_factory.mktemp("ws")
    marker = ws / MARKER
    make_model(ws / "tiny")  # n_layer 2, n_head 2, n_embd 64, n_positions 128
    make_model(ws / "other", seed=1)  # same shapes, other weights
    make_model(ws / "wide", n_embd=96)  # other shapes

    # models that are broken in some way
    (ws / "empty-dir").mkdir()
    for name in ("trunc-model", "evil-model", "llama-model", "badjson-model", "shape-model", "mem-model", "garbage-model"):
        (ws / name).mkdir()
        shutil.copy(ws / "tiny" / "config.json", ws / name / "config.json")
    blob = (ws / "tiny" / "model.safetensors").read_bytes()
    (ws / "trunc-model" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (ws / "garbage-model" / "model.safetensors").write_bytes(os.urandom(4096))
    write_evil(ws / "evil-model" / "pytorch_model.bin", marker)
    shutil.copy(ws / "tiny" / "model.safetensors", ws / "llama-model" / "model.safetensors")
    (ws / "llama-model" / "config.json").write_text(json.dumps({**json.loads((ws / "tiny" / "config.json").read_text()),
                                                                "model_type": "llama"}))
    shutil.copy(ws / "tiny" / "model.safetensors", ws / "badjson-model" / "model.safetensors")
    (ws / "badjson-model" / "config.json").write_text('{"model_type": "gpt2", ')
    shutil.copy(ws / "wide" / "model.safetensors", ws / "shape-model" / "model.safetensors")
    (ws / "mem-model" / "model.safetensors").symlink_to("/proc/self/mem")  # exists, but every read fails (EIO)
    write_evil(ws / "evil.bin", marker)
    (ws / "evil.pt").write_bytes((ws / "evil.bin").read_bytes())

    # adapters
    ad = ws / "adapters"
    ad.mkdir()
    save_adapter_for(ws / "tiny", ad / "good.safetensors")
    save_adapter_for(ws / "tiny", ad / "classifier.safetensors", labels=["ham", "spam"])
    save_adapter_for(ws / "other", ad / "other-base.safetensors")
    save_adapter_for(ws / "wide", ad / "wide.safetensors")
    save_adapter_for(ws / "tiny", ad / "rank.safetensors", r=8, header_r=4)
    save_adapter_for(ws / "tiny", ad / "inf.safetensors", fill=float("inf"))
    save_adapter_for(ws / "tiny", ad / "bad-task.safetensors", task="weird")
    save_adapter_for(ws / "tiny", ad / "bad-max-length.safetensors", data_max_length=-5)
    save_adapter_for(ws / "tiny", ad / "overflow.safetensors", fill=3e30)  # finite, but B A overflows fp32
    # prompt templates in an adapter's header are data: no attribute access, no gigabyte-wide format specs
    save_adapter_for(ws / "tiny", ad / "template-attr.safetensors", template="{instruction.__class__.__mro__}")
    save_adapter_for(ws / "tiny", ad / "template-width.safetensors", template="{instruction:>99999999999}")
    good = (ad / "good.safetensors").read_bytes()
    (ad / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (ws / "trunc.safetensors").write_bytes(blob[: len(blob) // 3])
    (ad / "garbage.safetensors").write_bytes(b"\xff" * 64 + os.urandom(1024))
    (ad / "empty.safetensors").write_bytes(b"")
    (ad / "model-not-adapter.safetensors").write_bytes(blob)  # a base model file, not an adapter
    lora_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True,
                "base_model_name_or_path": str(ws / "tiny"), "task_type": "CAUSAL_LM"}
    lora_tensors = {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{x}.weight": torch.zeros(shape)
                    for i in range(2) for x, shape in (("A", (4, 64)), ("B", (192, 4)))}
    peft_dir(ad / "peft-ia3", {"peft_type": "IA3", "target_modules": ["c_attn"], "base_model_name_or_path": "gpt2"},
             {"base_model.model.transformer.h.0.attn.c_attn.ia3_l": torch.ones(192, 1)})
    peft_dir(ad / "peft-loha", {**lora_cfg, "peft_type": "LOHA"}, lora_tensors)
    peft_dir(ad / "peft-rank", {**lora_cfg, "r": 8}, lora_tensors)
    peft_dir(ad / "peft-evil", lora_cfg, evil_marker=marker)
    peft_dir(ad / "peft-badjson", lora_cfg, lora_tensors)
    (ad / "peft-badjson" / "adapter_config.json").write_text("{'peft_type': LORA")

    # data files
    d = ws / "data"
    d.mkdir()
    (d / "good.json").write_text(json.dumps(alpaca_rows()))
    (d / "empty.json").write_text("")
    (d / "blank.jsonl").write_text("\n\n  \n")
    (d / "object.json").write_text(json.dumps({"data": alpaca_rows()}))
    (d / "scalars.json").write_text(json.dumps(["a", "b"]))
    (d / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(2))
                                    + '{"instruction": "x", "output": \n' + json.dumps(alpaca_rows()[3]) + "\n")
    (d / "ragged.csv").write_text("prompt,completion\nhello,world\nagain,and,again\n")
    (d / "header-only.csv").write_text("prompt,completion\n")
    (d / "dup-header.csv").write_text("prompt,prompt\na,b\n")
    (d / "list-line.jsonl").write_text(json.dumps(alpaca_rows()[0]) + "\n[1, 2]\n")
    (d / "latin1.csv").write_bytes("prompt,completion\ncaf\xe9,cr\xe8me\n".encode("latin-1"))
    no_output = alpaca_rows()
    del no_output[2]["output"]
    (d / "no-output.json").write_text(json.dumps(no_output))
    empty_output = alpaca_rows()
    empty_output[4]["output"] = "  "
    (d / "empty-output.json").write_text(json.dumps(empty_output))
    (d / "mr-only.csv").write_text("mr,reference\nname[A],A is a place.\nname[B],B is a place.\n")
    long_prompt = "word " * 300
    (d / "long-prompts.json").write_text(json.dumps([{"instruction": long_prompt, "input": "", "output": "ok"}] * 6))
    (d / "no-label.csv").write_text("text\nhello there\nbuy now\n")
    (d / "label-gap.csv").write_text("text,label\nhello there,ham\nbuy now,\nsee you,ham\nwin cash,spam\n")
    (d / "labeled.csv").write_text("text,label\n" + "hello there,ham\nsee you,ham\nwin cash,spam\nbuy now,spam\n" * 2)
    (d / "table.xlsx").write_bytes(b"PK\x03\x04" + os.urandom(64))
    (d / "dir.json").mkdir()
    (d / "mem.jsonl").symlink_to("/proc/self/mem")
    (d / "prompts-empty.txt").write_text("\n \n")
    (d / "prompts-latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "prompts-broken.jsonl").write_text('{"prompt": "hi"}\n{"prompt": \n')
    (d / "prompts-long.txt").write_text("word " * 400 + "\n")

    # plain files to put paths under (ENOTDIR), an existing merge target, a config that cannot be read
    (ws / "afile.txt").write_text("I am a file, not a directory.\n")
    (ws / "existing-merge").mkdir()
    (ws / "existing-merge" / "notes.txt").write_text("mine")
    (ws / "existing-export").mkdir()
    (ws / "existing-export" / "notes.txt").write_text("mine")
    (ws / "mem.yaml").symlink_to("/proc/self/mem")
    (ws / "hf-home").mkdir()
    yield ws


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A 64 KiB tmpfs filled to the brim, or None where mounting is not permitted."""
    mount = tmp_path_factory.mktemp("full-disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        (mount / "run").mkdir()  # an empty out_dir (train) that already exists
        fill_disk(mount)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------------ snapshots


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots: directories, and files with size, inode, mtime, ctime and (up to 1 MiB)
    SHA-256; symlinks by their own metadata, never followed. (The big inputs, model weights, are not hashed on
    every row: a write to them changes their mtime and ctime, a replacement their inode.)"""
    out: dict[str, tuple] = {}
    for root in roots:
        if root is None or not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = ("dir",)
            for name in filenames + [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if os.path.islink(p) or not os.path.isfile(p):
                    out[p] = ("special", st.st_mode)
                    continue
                digest = None
                if st.st_size <= 2**20:
                    with open(p, "rb") as fh:
                        digest = hashlib.sha256(fh.read()).hexdigest()
                out[p] = ("file", st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, digest)
    return out


def diff(before: dict, after: dict) -> list[str]:
    changes = [f"created {p}" for p in sorted(set(after) - set(before))]
    changes += [f"removed {p}" for p in sorted(set(before) - set(after))]
    changes += [f"modified {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return changes


# ------------------------------------------------------------------------------------------------ the table


def base_config(ws: Path, d: Path) -> dict:
    return {
        "model": str(ws / "tiny"),
        "out_dir": str(d / "out"),
        "data": {"train": str(ws / "data" / "good.json"), "val_split": 0.25, "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 0, "save_every": 0,
                  "log_every": 1},
    }


DELETE = object()


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def train_cfg(changes: dict | None = None, text: str | None = None, args: tuple = (), name: str = "run.yaml"):
    """argv builder: write a config (the base config with `changes`, or raw `text`), run `lora train` on it."""

    def build(ws: Path, d: Path) -> list[str]:
        path = d / name
        if text is not None:
            body = text.format(ws=ws, d=d)
            path.write_bytes(body.encode("latin-1") if "\xe9" in body else body.encode())
        else:
            path.write_text(yaml.safe_dump(merged(base_config(ws, d), changes or {}), sort_keys=False))
        return ["train", str(path), *args]

    return build


def argv(*parts: str):
    """argv builder from templates: {ws} and {d} are the workspace and this row's folder ({full}, the full disk,
    is filled in later)."""
    return lambda ws, d: [p.replace("{ws}", str(ws)).replace("{d}", str(d)) for p in parts]


def with_file(name: str, text: str, *parts: str):
    """argv builder that first writes d/name."""

    def build(ws: Path, d: Path) -> list[str]:
        (d / name).write_text(text)
        return argv(*parts)(ws, d)

    return build


@dataclass
class Row:
    id: str
    command: str  # the `lora` command the row runs (test_enough_rows counts rows per command)
    build: Callable[[Path, Path], list[str]]
    code: int
    expect: tuple[str, ...]  # substrings of stderr ({ws} and {d} are filled in)
    setup: Callable[[Path, Path], None] | None = None
    logs: bool = False  # a run that fails after it started logging: earlier stderr lines are its log
    needs: str | None = None  # "full_disk"
    tags: tuple[str, ...] = field(default_factory=tuple)


def make_run_dir(ws: Path, d: Path) -> None:
    """A finished-looking run directory in d/out (for --resume rows)."""
    (d / "out" / "checkpoint").mkdir(parents=True)
    (d / "out" / "adapter.safetensors").write_bytes((ws / "adapters" / "good.safetensors").read_bytes())
    (d / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')


def corrupt_checkpoint(ws: Path, d: Path) -> None:
    make_run_dir(ws, d)
    (d / "out" / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 not a zip archive at all")


def evil_checkpoint(ws: Path, d: Path) -> None:
    make_run_dir(ws, d)
    write_evil(d / "out" / "checkpoint" / "state.pt", ws / MARKER)


def foreign_checkpoint(ws: Path, d: Path) -> None:
    make_run_dir(ws, d)
    torch.save({"weight": torch.zeros(2)}, d / "out" / "checkpoint" / "state.pt")


def keep_file(ws: Path, d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine")


ROWS = [
    # ------------------------------------------------------------------ info
    Row("info-missing-path", "info", argv("info", "{ws}/no-such-model"), 1, ("{ws}/no-such-model", "does not exist")),
    Row("info-adapter-as-model", "info", argv("info", "{ws}/adapters/good.safetensors"), 1,
        ("good.safetensors is a lora-cli adapter, not a model; name its base model here (the adapter goes to "
         "--adapter)",)),
    Row("info-empty-dir", "info", argv("info", "{ws}/empty-dir"), 1, ("{ws}/empty-dir", "config.json")),
    Row("info-config-bad-json", "info", argv("info", "{ws}/badjson-model"), 1, ("badjson-model/config.json",)),
    Row("info-not-gpt2", "info", argv("info", "{ws}/llama-model"), 1, ("llama-model/config.json", "llama")),
    Row("info-unknown-preset", "info", argv("info", "--random", "gpt5"), 2, ("gpt5",)),
    Row("info-lora-config-yaml-error", "info",
        with_file("c.yaml", "lora: {r: 4\n", "info", "--random", "gpt2", "--lora-config", "{d}/c.yaml"),
        2, ("c.yaml", "invalid YAML")),
    Row("info-bad-flag", "info", argv("info", "gpt2", "--bogus"), 2, ("--bogus",)),
    Row("info-truncated-weights-file", "info", argv("info", "{ws}/trunc.safetensors"), 1,
        ("trunc.safetensors", "truncated")),
    Row("info-missing-argument", "info", argv("info"), 2, ("model",)),
    # ------------------------------------------------------------------ train: the config (exit 2)
    Row("config-missing", "train", argv("train", "{d}/nope.yaml"), 2, ("{d}/nope.yaml", "does not exist")),
    Row("config-is-directory", "train", argv("train", "{ws}/empty-dir"), 2, ("{ws}/empty-dir", "directory")),
    Row("config-unreadable", "train", argv("train", "{ws}/mem.yaml"), 2, ("{ws}/mem.yaml",)),
    Row("config-yaml-syntax", "train", train_cfg(text="model: {ws}/tiny\ndata:\n  train: [a, b\nlora: {{r: 4}}\n"),
        2, ("run.yaml:", "invalid YAML")),
    Row("config-duplicate-key", "train", train_cfg(text="model: {ws}/tiny\ndata: {{train: a.json}}\nlora:\n  r: 4\n"
                                                        "  alpha: 8\n  r: 0\n"), 2,
        ("run.yaml:6: key lora.r appears twice (first on line 4); keep one",)),
    Row("config-empty", "train", train_cfg(text=""), 2, ("run.yaml", "empty")),
    Row("config-hub-dataset-misnamed", "train", train_cfg({"data": {"train": "hf://owner/name", "val_split": 0.5,
                                                                    "test_split": 0.5}}), 2,
        ("run.yaml: 2 problems: data.val_split + data.test_split: must leave training data (sum < 1), got 0.5 + 0.5; "
         "line 4: data.train: 'hf://owner/name': a hub dataset is named hf://datasets/OWNER/NAME",)),
    Row("config-not-mapping", "train", train_cfg(text="- model: gpt2\n"), 2, ("run.yaml", "mapping")),
    Row("config-non-utf8", "train", train_cfg(text="model: {ws}/tiny  # caf\xe9\n"), 2, ("run.yaml", "UTF-8")),
    Row("config-unknown-key", "train", train_cfg({"train": {"warmup_step": 3}}), 2,
        ("train.warmup_step", "unknown key", "did you mean warmup_steps")),
    Row("config-unknown-top-key", "train", train_cfg({"outdir": "x"}), 2, ("outdir", "did you mean out_dir")),
    Row("config-wrong-type", "train", train_cfg({"train": {"batch_size": "eight"}}), 2, ("train.batch_size", "integer")),
    Row("config-wrong-type-list", "train", train_cfg({"lora": {"targets": {"a": 1}}}), 2, ("lora.targets",)),
    Row("config-batch-size-zero", "train", train_cfg({"train": {"batch_size": 0}}), 2, ("train.batch_size", ">= 1")),
    Row("config-lr-negative", "train", train_cfg({"train": {"lr": -1}}), 2, ("train.lr", "> 0")),
    Row("config-lr-nan", "train", train_cfg({"train": {"lr": float("nan")}}), 2, ("train.lr", "finite")),
    Row("config-rank-negative", "train", train_cfg({"lora": {"r": -4}}), 2, ("lora.r",)),
    Row("config-max-length-zero", "train", train_cfg({"data": {"max_length": 0}}), 2, ("data.max_length",)),
    Row("config-model-missing", "train", train_cfg({"model": DELETE}), 2, ("model", "required")),
    Row("config-model-empty", "train", train_cfg({"model": ""}), 2, ("model",)),
    Row("config-columns-unknown-role", "train", train_cfg({"data": {"columns": {"respons": "output"}}}), 2,
        ("data.columns.respons", "unknown role")),
    Row("config-val-split-one", "train", train_cfg({"data": {"val_split": 1.0}}), 2, ("data.val_split",)),
    Row("config-data-train-missing", "train", train_cfg({"data": {"train": DELETE}}), 2, ("data.train", "required")),
    # one problem that needs the model names the config file as several do
    Row("config-max-length-above-context", "train", train_cfg({"data": {"max_length": 4096}}), 2,
        ("run.yaml: data.max_length: 4096 is above the model's context (n_positions = 128)",)),
    Row("config-target-matches-nothing", "train", train_cfg({"lora": {"targets": ["attn.c_atn"]}}), 2,
        ("run.yaml: lora.targets: 'attn.c_atn' matches no linear layer",)),
    Row("config-random-preset-unknown", "train", train_cfg({"model": {"name": "gpt5", "init": "random"}}), 2,
        ("run.yaml: model: init: random needs a preset name (gpt2,", "got 'gpt5'")),
    Row("config-random-sizes-misfit", "train", train_cfg({"model": {"name": "gpt2", "init": "random", "n_layer": 1,
                                                                     "n_head": 3, "n_embd": 32}}), 2,
        ("run.yaml: model: bad architecture override: n_embd (32) must be divisible by n_head (3)",)),
    # the checks that need the model, all in one line (the tiny model: 2 blocks, 128 positions)
    Row("config-model-checks-at-once", "train", train_cfg({"data": {"max_length": 4096}, "lora": {
        "targets": ["attn.c_atn", "mlp.fc", "attn.c_attn"], "layers": [5], "modules_to_save": ["wte2"]}}), 2,
        ("run.yaml: 4 problems: data.max_length: 4096 is above the model's context (n_positions = 128); set "
         "data.max_length to at most 128; lora.layers: block 5 does not exist; the model has blocks 0-1; "
         "lora.targets: 'attn.c_atn', 'mlp.fc' match no linear layer; available: ",
         "; lora.modules_to_save: 'wte2' matches no module; top-level modules: ")),
    # a classifier's: its head (score) is a target like any other, once the data gave the labels
    Row("config-classifier-model-checks-at-once", "train", train_cfg({"task": "classification", "data": {
        "train": "{ws}/data/labeled.csv", "max_length": 4096}, "lora": {"targets": ["attn.c_atn", "score"],
                                                                       "layers": [5]}}), 2,
        ("run.yaml: 3 problems: data.max_length: 4096 is above the model's context (n_positions = 128); set "
         "data.max_length to at most 128; lora.layers: block 5 does not exist; the model has blocks 0-1; "
         "lora.targets: 'attn.c_atn' matches no linear layer; available: ",)),
    Row("config-pattern-and-overlap-checks-at-once", "train", train_cfg({"lora": {
        "targets": ["attn.c_attn"], "rank_pattern": {"nomatch": 4, "nope": 2}, "alpha_pattern": {"zzz": 8},
        "modules_to_save": ["transformer.h.0.attn"]}}), 2,
        ("run.yaml: 3 problems: lora.rank_pattern: 'nomatch', 'nope' match none of the targeted layers",
         "; lora.alpha_pattern: 'zzz' matches none of the targeted layers",
         "; lora.modules_to_save: transformer.h.0.attn overlaps the LoRA target transformer.h.0.attn.c_attn")),
    Row("config-bad-regex-targets-and-empty-layers", "train", train_cfg({"lora": {
        "targets": ["re:(", "re:[a-"], "modules_to_save": ["re:)"], "layers": []}}), 2,
        ("run.yaml: 4 problems", "lora.layers: is empty, so no block would be adapted",
         "lora.targets: 're:(' is not a valid regular expression", "lora.targets: 're:[a-' is not a valid",
         "lora.modules_to_save: 're:)' is not a valid regular expression")),
    # missing data files are named before the model loads (here a model that does not exist either)
    Row("data-missing-files-before-the-model", "train", train_cfg({
        "model": "{ws}/no-such-model", "data": {"train": "{ws}/data/nope.json", "val": "{ws}/data/nope-val.csv",
                                                "val_split": DELETE, "test": "hf://datasets/x"}}), 1,
        ("run.yaml: 3 problems: data.train: {ws}/data/nope.json does not exist; check the path (relative paths are "
         "resolved against the config file's folder); data.val: {ws}/data/nope-val.csv does not exist",
         "; data.test: hf://datasets/x is not a hub dataset name; write hf://datasets/OWNER/NAME")),
    Row("data-unsupported-type-before-the-model", "train", train_cfg({
        "model": "{ws}/no-such-model", "data": {"train": "{ws}/tiny/model.safetensors"}}), 1,
        ("run.yaml: data.train: {ws}/tiny/model.safetensors: unsupported file type '.safetensors'; use .csv",)),
    Row("flag-set-without-value", "train", lambda ws, d: train_cfg()(ws, d) + ["--set", "train.lr"], 2,
        ("--set", "train.lr")),
    Row("flag-set-unknown-key", "train", lambda ws, d: train_cfg()(ws, d) + ["--set", "train.bach_size=2"], 2,
        ("train.bach_size", "did you mean batch_size")),
    Row("flag-resume-and-overwrite", "train", lambda ws, d: train_cfg()(ws, d) + ["--resume", "--overwrite"], 2,
        ("--resume", "--overwrite")),
    Row("flag-unknown", "train", lambda ws, d: train_cfg()(ws, d) + ["--bogus"], 2, ("--bogus",)),
    # ------------------------------------------------------------------ train: the data (exit 1)
    Row("data-missing-file", "train", train_cfg({"data": {"train": "{ws}/data/nope.json"}}), 1,
        ("data.train", "nope.json", "does not exist")),
    Row("data-is-directory", "train", train_cfg({"data": {"train": "{ws}/data/dir.json"}}), 1,
        ("dir.json", "directory")),
    Row("data-unreadable", "train", train_cfg({"data": {"train": "{ws}/data/mem.jsonl"}}), 1, ("mem.jsonl", "cannot read")),
    Row("data-empty-file", "train", train_cfg({"data": {"train": "{ws}/data/empty.json"}}), 1, ("empty.json", "empty")),
    Row("data-blank-jsonl", "train", train_cfg({"data": {"train": "{ws}/data/blank.jsonl"}}), 1, ("blank.jsonl",)),
    Row("data-json-object", "train", train_cfg({"data": {"train": "{ws}/data/object.json"}}), 1,
        ("object.json", "object", "list")),
    Row("data-json-scalars", "train", train_cfg({"data": {"train": "{ws}/data/scalars.json"}}), 1,
        ("scalars.json", "row 1")),
    Row("data-jsonl-broken-line", "train", train_cfg({"data": {"train": "{ws}/data/broken.jsonl"}}), 1,
        ("broken.jsonl", "line 3")),
    Row("data-csv-ragged", "train", train_cfg({"data": {"train": "{ws}/data/ragged.csv"}}), 1,
        ("ragged.csv", "row 2", "line 3")),
    Row("data-csv-header-only", "train", train_cfg({"data": {"train": "{ws}/data/header-only.csv"}}), 1,
        ("header-only.csv", "no data rows")),
    Row("data-non-utf8", "train", train_cfg({"data": {"train": "{ws}/data/latin1.csv"}}), 1,
        ("latin1.csv", "UTF-8", "line 2")),
    Row("data-row-without-output", "train", train_cfg({"data": {"train": "{ws}/data/no-output.json"}}), 1,
        ("no-output.json", "row 3", "output")),
    Row("data-row-empty-output", "train", train_cfg({"data": {"train": "{ws}/data/empty-output.json"}}), 1,
        ("empty-output.json", "row 5", "output")),
    Row("data-csv-without-named-column", "train",
        train_cfg({"data": {"train": "{ws}/data/mr-only.csv", "columns": {"prompt": "mr", "completion": "ref"}}}), 1,
        ("mr-only.csv", "'ref'", "data.columns.completion")),
    Row("data-unknown-columns", "train", train_cfg({"data": {"train": "{ws}/data/mr-only.csv"}}), 1,
        ("mr-only.csv", "mr, reference")),
    Row("data-prompts-longer-than-max-length", "train", train_cfg({"data": {"train": "{ws}/data/long-prompts.json"}}),
        1, ("long-prompts.json", "max_length")),
    Row("data-labels-missing", "train",
        train_cfg({"task": "classification", "data": {"train": "{ws}/data/no-label.csv"}}), 1,
        ("no-label.csv", "label")),
    Row("data-label-empty-row", "train",
        train_cfg({"task": "classification", "data": {"train": "{ws}/data/label-gap.csv"}}), 1,
        ("label-gap.csv", "row 2", "label")),
    Row("data-format-without-its-column", "train", train_cfg({"data": {"format": "text"}}), 1,
        ("good.json", "'text'", "data.columns.text")),
    Row("data-csv-duplicate-header", "train", train_cfg({"data": {"train": "{ws}/data/dup-header.csv"}}), 1,
        ("dup-header.csv", "duplicate column name 'prompt'")),
    Row("data-jsonl-line-not-object", "train", train_cfg({"data": {"train": "{ws}/data/list-line.jsonl"}}), 1,
        ("list-line.jsonl", "line 2", "list")),
    Row("data-unsupported-type", "train", train_cfg({"data": {"train": "{ws}/data/table.xlsx"}}), 1,
        ("table.xlsx", ".xlsx")),
    Row("data-val-broken", "train", train_cfg({"data": {"val": "{ws}/data/broken.jsonl", "val_split": DELETE}}), 1,
        ("broken.jsonl", "line 3")),
    # ------------------------------------------------------------------ train: the model (exit 1)
    Row("model-missing-path", "train", train_cfg({"model": "{ws}/no-such-model"}), 1, ("no-such-model",)),
    Row("model-truncated-safetensors", "train", train_cfg({"model": "{ws}/trunc-model"}), 1,
        ("trunc-model/model.safetensors", "truncated")),
    Row("model-garbage-safetensors", "train", train_cfg({"model": "{ws}/garbage-model"}), 1,
        ("garbage-model/model.safetensors",)),
    Row("model-unreadable", "train", train_cfg({"model": "{ws}/mem-model"}), 1, ("mem-model/model.safetensors",)),
    Row("model-malicious-pickle-dir", "train", train_cfg({"model": "{ws}/evil-model"}), 1,
        ("evil-model/pytorch_model.bin",), tags=("pickle",)),
    Row("model-malicious-pickle-file", "train", train_cfg({"model": "{ws}/evil.bin"}), 1, ("evil.bin",), tags=("pickle",)),
    Row("model-shape-mismatch", "train", train_cfg({"model": "{ws}/shape-model"}), 1, ("shape-model", "shape")),
    Row("model-not-gpt2", "train", train_cfg({"model": "{ws}/llama-model"}), 1, ("llama-model/config.json",)),
    # ------------------------------------------------------------------ train: the run directory
    Row("out-dir-under-a-file", "train", train_cfg({"out_dir": "{ws}/afile.txt/run"}), 1, ("afile.txt/run",)),
    # (root may write anywhere, so /proc is found out at the first write, after the run has loaded and logged)
    Row("out-dir-in-proc", "train", train_cfg({"out_dir": "/proc/lora-run"}), 1, ("/proc/lora-run",), logs=True),
    Row("out-dir-not-a-run", "train", train_cfg(), 1, ("{d}/out", "holds files no lora-cli run wrote (keep.txt)"),
        setup=keep_file),
    Row("resume-without-checkpoint", "train", train_cfg(args=("--resume",)), 1, ("--resume", "checkpoint"),
        setup=keep_file),
    # (the checkpoint is read once the model is built, so the run's first log lines come before the error)
    Row("resume-corrupt-checkpoint", "train", train_cfg(args=("--resume",)), 1, ("state.pt", "unreadable"),
        setup=corrupt_checkpoint, logs=True),
    Row("resume-malicious-checkpoint", "train", train_cfg(args=("--resume",)), 1, ("state.pt", "unreadable"),
        setup=evil_checkpoint, logs=True, tags=("pickle",)),
    Row("resume-not-a-checkpoint", "train", train_cfg(args=("--resume",)), 1, ("state.pt", "not a lora-cli checkpoint"),
        setup=foreign_checkpoint, logs=True),
    Row("out-dir-is-a-file", "train", train_cfg({"out_dir": "{ws}/afile.txt"}), 1, ("afile.txt", "is a file")),
    Row("overwrite-with-broken-data-keeps-old-run", "train",
        train_cfg({"data": {"train": "{ws}/data/ragged.csv"}}, args=("--overwrite",)), 1, ("ragged.csv", "row 2"),
        setup=make_run_dir),
    Row("disk-full", "train", train_cfg({"out_dir": "{full}/run"}), 1, ("No space left",), logs=True,
        needs="full_disk"),
    # ------------------------------------------------------------------ eval
    Row("eval-nothing-named", "eval", argv("eval", "--data", "{ws}/data/good.json"), 2, ("--adapter", "--model")),
    Row("eval-adapter-missing", "eval", argv("eval", "--adapter", "{ws}/adapters/nope.safetensors", "--data",
                                             "{ws}/data/good.json"), 1, ("nope.safetensors", "does not exist")),
    Row("eval-adapter-truncated", "eval", argv("eval", "--adapter", "{ws}/adapters/trunc.safetensors", "--data",
                                               "{ws}/data/good.json"), 1, ("trunc.safetensors", "truncated")),
    Row("eval-adapter-empty-file", "eval", argv("eval", "--adapter", "{ws}/adapters/empty.safetensors", "--data",
                                                "{ws}/data/good.json"), 1, ("empty.safetensors",)),
    Row("eval-adapter-is-a-model", "eval", argv("eval", "--adapter", "{ws}/adapters/model-not-adapter.safetensors",
                                                "--data", "{ws}/data/good.json"), 1,
        ("model-not-adapter.safetensors", "not a lora-cli adapter")),
    Row("eval-adapter-other-base", "eval", argv("eval", "--adapter", "{ws}/adapters/other-base.safetensors",
                                                "--model", "{ws}/tiny", "--data", "{ws}/data/good.json"), 1,
        ("other-base.safetensors", "fingerprint")),
    Row("eval-adapter-other-shape", "eval", argv("eval", "--adapter", "{ws}/adapters/wide.safetensors", "--model",
                                                 "{ws}/tiny", "--data", "{ws}/data/good.json", "--allow-mismatch"), 1,
        ("wide.safetensors", "shape")),
    Row("eval-adapter-other-rank", "eval", argv("eval", "--adapter", "{ws}/adapters/rank.safetensors", "--data",
                                                "{ws}/data/good.json"), 1, ("rank.safetensors", "shape")),
    Row("eval-adapter-damaged-max-length", "eval", argv("eval", "--adapter", "{ws}/adapters/bad-max-length.safetensors",
                                                        "--data", "{ws}/data/good.json"), 1,
        ("bad-max-length.safetensors: the adapter's settings are damaged (data.max_length -5 is not an integer >= 2)",)),
    Row("export-adapter-damaged-task", "export", argv("export", "{ws}/adapters/bad-task.safetensors", "{d}/peft"), 1,
        ("bad-task.safetensors: the adapter's settings are damaged (task 'weird' is not causal_lm or classification)",)),
    Row("eval-adapter-non-finite", "eval", argv("eval", "--adapter", "{ws}/adapters/inf.safetensors", "--data",
                                                "{ws}/data/good.json"), 1, ("inf.safetensors", "finite")),
    Row("eval-peft-ia3", "eval", argv("eval", "--adapter", "{ws}/adapters/peft-ia3", "--model", "{ws}/tiny", "--data",
                                      "{ws}/data/good.json"), 1, ("peft-ia3", "IA3")),
    Row("eval-peft-rank-mismatch", "eval", argv("eval", "--adapter", "{ws}/adapters/peft-rank", "--model", "{ws}/tiny",
                                                "--data", "{ws}/data/good.json"), 1, ("peft-rank", "rank")),
    Row("eval-peft-malicious-bin", "eval", argv("eval", "--adapter", "{ws}/adapters/peft-evil", "--model", "{ws}/tiny",
                                                "--data", "{ws}/data/good.json"), 1,
        ("peft-evil/adapter_model.bin",), tags=("pickle",)),
    Row("eval-peft-config-bad-json", "eval", argv("eval", "--adapter", "{ws}/adapters/peft-badjson", "--model",
                                                  "{ws}/tiny", "--data", "{ws}/data/good.json"), 1,
        ("peft-badjson/adapter_config.json",)),
    Row("eval-data-broken-jsonl", "eval", argv("eval", "--adapter", "{ws}/adapters/good.safetensors", "--data",
                                               "{ws}/data/broken.jsonl"), 1, ("broken.jsonl", "line 3")),
    Row("eval-data-missing", "eval", argv("eval", "--model", "{ws}/tiny", "--data", "{ws}/data/nope.csv"), 1,
        ("nope.csv", "does not exist")),
    Row("eval-prompts-longer-than-context", "eval", argv("eval", "--model", "{ws}/tiny", "--data",
                                                         "{ws}/data/long-prompts.json"), 1,
        ("long-prompts.json", "128")),
    Row("eval-max-length-above-context", "eval", argv("eval", "--model", "{ws}/tiny", "--data",
                                                      "{ws}/data/long-prompts.json", "--max-length", "4096"), 2,
        ("--max-length 4096", "n_positions = 128")),
    Row("eval-config-not-yaml", "eval", argv("eval", "{ws}/data/good.json"), 2, ("good.json", ".yaml")),
    Row("eval-bad-format", "eval", argv("eval", "--model", "{ws}/tiny", "--data", "{ws}/data/good.json", "--format",
                                        "xml"), 2, ("--format", "xml")),
    Row("eval-bad-column-flag", "eval", argv("eval", "--model", "{ws}/tiny", "--data", "{ws}/data/good.json",
                                             "--column", "prompt"), 2, ("--column", "ROLE=COLUMN")),
    Row("eval-batch-size-zero", "eval", argv("eval", "--model", "{ws}/tiny", "--data", "{ws}/data/good.json",
                                             "--batch-size", "0"), 2, ("--batch-size",)),
    # ------------------------------------------------------------------ merge
    Row("merge-out-exists", "merge", argv("merge", "--adapter", "{ws}/adapters/good.safetensors", "--out",
                                          "{ws}/existing-merge"), 2, ("existing-merge", "--overwrite")),
    Row("merge-out-under-a-file", "merge", argv("merge", "--adapter", "{ws}/adapters/good.safetensors", "--out",
                                                "{ws}/afile.txt/merged"), 1, ("afile.txt/merged",)),
    Row("merge-non-finite-result", "merge", argv("merge", "--adapter", "{ws}/adapters/overflow.safetensors", "--out",
                                                 "{d}/merged"), 1, ("finite",)),
    Row("merge-bad-dtype", "merge", argv("merge", "--adapter", "{ws}/adapters/good.safetensors", "--out", "{d}/merged",
                                         "--dtype", "fp8"), 2, ("--dtype", "fp8")),
    Row("merge-adapter-truncated", "merge", argv("merge", "--adapter", "{ws}/adapters/trunc.safetensors", "--out",
                                                 "{d}/merged"), 1, ("trunc.safetensors",)),
    Row("merge-disk-full", "merge", argv("merge", "--adapter", "{ws}/adapters/good.safetensors", "--out",
                                         "{full}/merged"), 1, ("{full}/merged", "No space left"), needs="full_disk",
        logs=True),
    # ------------------------------------------------------------------ generate
    Row("generate-nothing-named", "generate", argv("generate", "hello"), 2, ("--adapter", "--model")),
    Row("generate-no-prompt", "generate", argv("generate", "--model", "{ws}/tiny"), 2, ("prompt",)),
    Row("generate-adapter-garbage", "generate", argv("generate", "--adapter", "{ws}/adapters/garbage.safetensors",
                                                     "hello"), 1, ("garbage.safetensors",)),
    Row("generate-prompt-file-empty", "generate", argv("generate", "--model", "{ws}/tiny", "--file",
                                                       "{ws}/data/prompts-empty.txt"), 1, ("prompts-empty.txt",)),
    Row("generate-prompt-file-non-utf8", "generate", argv("generate", "--model", "{ws}/tiny", "--file",
                                                          "{ws}/data/prompts-latin1.txt"), 1,
        ("prompts-latin1.txt", "UTF-8")),
    Row("generate-prompt-file-broken-jsonl", "generate", argv("generate", "--model", "{ws}/tiny", "--json", "--file",
                                                              "{ws}/data/prompts-broken.jsonl"), 1,
        ("prompts-broken.jsonl", "line 2")),
    Row("generate-prompt-longer-than-context", "generate", argv("generate", "--model", "{ws}/tiny", "--max-new-tokens",
                                                                "8", "--file", "{ws}/data/prompts-long.txt"), 1,
        ("prompts-long.txt", "128")),
    Row("generate-adapter-template-attribute", "generate", argv("generate", "--adapter",
                                                                "{ws}/adapters/template-attr.safetensors", "hi"), 1,
        ("data.prompt_template", "instruction.__class__.__mro__", "plain {{name}}")),
    Row("generate-adapter-template-huge-width", "generate", argv("generate", "--adapter",
                                                                 "{ws}/adapters/template-width.safetensors", "hi"), 1,
        ("data.prompt_template", "instruction:>99999999999")),
    Row("generate-prompt-file-missing", "generate", argv("generate", "--model", "{ws}/tiny", "--file",
                                                         "{ws}/data/nope.txt"), 1, ("nope.txt", "does not exist")),
    Row("generate-bad-temperature", "generate", argv("generate", "--model", "{ws}/tiny", "--temperature", "-1", "hi"),
        2, ("temperature",)),
    Row("generate-bad-top-p", "generate", argv("generate", "--model", "{ws}/tiny", "--top-p", "1.5", "hi"), 2,
        ("--top-p must be in (0, 1], got 1.5",)),
    Row("generate-max-new-tokens-negative", "generate", argv("generate", "--model", "{ws}/tiny", "--max-new-tokens",
                                                             "-3", "hi"), 2,
        ("--max-new-tokens must be a non-negative integer, got -3",)),
    # ------------------------------------------------------------------ export
    Row("export-out-has-other-files", "export", argv("export", "{ws}/adapters/good.safetensors", "{ws}/existing-export"),
        2, ("existing-export", "notes.txt")),
    Row("export-adapter-truncated", "export", argv("export", "{ws}/adapters/trunc.safetensors", "{d}/peft"), 1,
        ("trunc.safetensors",)),
    Row("export-peft-loha", "export", argv("export", "{ws}/adapters/peft-loha", "{d}/peft"), 1, ("peft-loha", "LOHA")),
    Row("export-out-under-a-file", "export", argv("export", "{ws}/adapters/good.safetensors", "{ws}/afile.txt/peft"), 1,
        ("afile.txt/peft", "afile.txt is not a directory; choose another path")),
    Row("export-bad-format", "export", argv("export", "{ws}/adapters/good.safetensors", "{d}/peft", "--format", "onnx"),
        2, ("--format", "onnx")),
    # ------------------------------------------------------------------ predict (classification inference)
    Row("predict-adapter-truncated", "predict", argv("predict", "--adapter", "{ws}/adapters/trunc.safetensors", "hi"),
        1, ("trunc.safetensors",)),
    Row("predict-causal-lm-adapter", "predict", argv("predict", "--adapter", "{ws}/adapters/good.safetensors", "hi"),
        2, ("good.safetensors", "classif")),
    Row("predict-batch-size-zero", "predict", argv("predict", "--adapter", "{ws}/adapters/good.safetensors",
                                                   "--batch-size", "0", "hi"), 2, ("--batch-size",)),
    Row("predict-file-missing", "predict", argv("predict", "--adapter", "{ws}/adapters/classifier.safetensors",
                                                "--file", "{ws}/data/nope.txt"), 1, ("nope.txt",)),
    Row("predict-file-non-utf8", "predict", argv("predict", "--adapter", "{ws}/adapters/classifier.safetensors",
                                                 "--file", "{ws}/data/prompts-latin1.txt"), 1, ("prompts-latin1.txt",)),
    Row("predict-adapter-missing", "predict", argv("predict", "--adapter", "{ws}/adapters/nope.safetensors", "hi"), 1,
        ("nope.safetensors",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, ws, full_disk, tmp_path):
    if row.needs == "full_disk" and full_disk is None:
        pytest.skip("mounting a tmpfs to simulate a full disk is not permitted here")
    d = tmp_path
    roots = (ws, d, full_disk)
    fmt = lambda s: s.format(ws=ws, d=d, full=full_disk)  # noqa: E731
    if row.setup is not None:
        row.setup(ws, d)
    # The argv builder writes the row's config; the snapshot is taken after that, so everything it holds
    # afterwards was done by the CLI.
    args = [a.replace("{full}", str(full_disk)) for a in row.build(ws, d)]
    for cfg in d.glob("*.yaml"):
        text = cfg.read_bytes()
        for key, value in ((b"{full}", str(full_disk)), (b"{ws}", str(ws))):
            text = text.replace(key, value.encode())
        cfg.write_bytes(text)
    before = snapshot(*roots)
    result = cli(*args, cwd=d, env=child_env(ws))
    after = snapshot(*roots)

    context = f"argv: {args}\nrc: {result.rc}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert result.rc == row.code, context
    assert "Traceback" not in result.stderr, context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if not row.logs:
        assert 1 <= len(lines) <= 2, context
    assert lines and lines[-1].startswith("error: "), context
    assert sum(line.startswith("error") for line in lines) == 1, context
    for want in row.expect:
        assert fmt(want) in result.stderr, f"{fmt(want)!r} not in stderr\n{context}"
    assert not (ws / MARKER).exists(), "a malicious pickle's payload ran"
    assert diff(before, after) == [], context


# ------------------------------------------------------------------------------------ the harness itself


def test_enough_rows():
    assert len(ROWS) >= 40
    by_command: dict[str, int] = {}
    for row in ROWS:
        by_command[row.command] = by_command.get(row.command, 0) + 1
    assert set(by_command) >= {"info", "train", "eval", "merge", "generate", "export"}


def test_malicious_pickle_is_live(ws, tmp_path):
    """The pickles used above really run code when unpickled without weights_only (so the rows prove something)."""
    marker = tmp_path / "ran"
    write_evil(tmp_path / "evil.bin", marker)
    code = f"import torch; torch.load({str(tmp_path / 'evil.bin')!r}, weights_only=False)"
    python("-c", code)
    assert marker.exists()


REAL_ROWS = ["config-unknown-key", "data-jsonl-broken-line", "model-malicious-pickle-dir"]


@pytest.mark.parametrize("row_id", REAL_ROWS)
def test_zygote_matches_python_m(row_id, ws, tmp_path):
    """A forked zygote child behaves as `python -m lora_cli`: same exit code and stderr."""
    if REAL_CLI:
        pytest.skip("LORA_TEST_REAL_CLI=1: every row already runs with python -m lora_cli")
    row = next(r for r in ROWS if r.id == row_id)
    results = []
    for how in ("zygote", "real"):
        d = tmp_path / how
        d.mkdir()
        args = row.build(ws, d)
        env = child_env(ws)
        results.append(warm_zygote().run(args, d, env) if how == "zygote" else cli_fresh(*args, cwd=d, env=env))
    z, real = results
    assert z.rc == real.rc == row.code
    assert z.stderr.replace("/zygote/", "/X/") == real.stderr.replace("/real/", "/X/")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(how, ws, tmp_path):
    """LORA_DEBUG=1 or --debug: the full traceback, for bug reports (and still a failing exit code)."""
    args = train_cfg({"data": {"train": str(ws / "data" / "broken.jsonl")}})(ws, tmp_path)
    extra = {"LORA_DEBUG": "1"} if how == "env" else {}
    if how == "flag":
        args = ["--debug", *args]
    result = cli(*args, cwd=tmp_path, env=child_env(ws, **extra))
    assert result.rc == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "lora_cli.errors.DataError" in result.stderr and "line 3" in result.stderr


def test_hf_token_is_never_printed(ws, tmp_path):
    """The Hugging Face token (HF_TOKEN, read by huggingface_hub) appears in no output, even when a hub
    download fails or --debug prints a traceback."""
    secret = "hf_lorasecret0123456789ABCDEFGHIJ"
    cfg = train_cfg({"model": "someone/private-gpt2"})(ws, tmp_path)
    for args in (["info", "someone/private-gpt2"], cfg, ["--debug", *cfg]):
        result = cli(*args, cwd=tmp_path, env=child_env(ws, HF_TOKEN=secret))
        assert result.rc == 1, result.stderr
        assert "private-gpt2" in result.stderr
        assert secret not in result.stderr + result.stdout
