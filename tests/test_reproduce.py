"""The two reproduction scripts end to end on a tiny random GPT-2 and a few rows (CI smoke: no GPT-2 weights
here), the reference trainable-parameter counts of both configs, and the E2E config against the paper."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lora_cli.config import load_config
from lora_cli.metrics import generation_metrics

from helpers import cli

ROOT = Path(__file__).parent.parent
SCRIPTS, CONFIGS, DATA = ROOT / "scripts", ROOT / "configs", ROOT / "data"
TINY = "model={name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64}"


def run_script(name, *args, **env):
    done = subprocess.run(["bash", str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def tiny_trainable(targets, classes=None):
    """Trainable parameters of the tiny model under r=4/16 LoRA, counted on the meta device."""
    from lora_cli.pretrained import load_model
    from lora_cli.config import LoraConfig
    from lora_cli.lora import apply_lora, count_parameters
    from lora_cli.models import add_classification_head

    model = load_model({"name": "gpt2", "init": "random", "n_layer": 2, "n_head": 2, "n_embd": 64},
                       weights=False).model
    if classes:
        with torch.device("meta"):
            add_classification_head(model, classes)
    apply_lora(model, LoraConfig(r=16 if classes else 4, targets=targets))
    return count_parameters(model)[0]


def test_appendix_e_script_smoke(tmp_path):
    rows = [line for line in (DATA / "sms_spam.tsv").read_text(encoding="utf-8").splitlines()]
    small = [r for r in rows if r.startswith("spam\t")][:20] + [r for r in rows if r.startswith("ham\t")][:30]
    (tmp_path / "spam.tsv").write_text("\n".join(small) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    stdout, stderr = run_script("reproduce_appendix_e.sh", "--set", TINY, "--set", f"data.train={tmp_path / 'spam.tsv'}",
                                "--set", "train.max_steps=3", "--set", f"out_dir={out}")
    report = json.loads((out / "reproduction.json").read_text())
    ours = report["ours"]
    # ham undersampled to the 20 spam messages, 20% of the 40 held out as the test split the script evaluated
    assert ours["test_examples"] == 8 and len((out / "test.csv").read_text().splitlines()) == 1 + 8
    assert ours["test_accuracy"] in {k / 8 for k in range(9)}
    expected = tiny_trainable(["attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "score"], 2)
    assert ours["trainable_parameters"] == expected
    assert report["published"] == {"trainable_parameters": 2_666_528, "test_accuracy": [0.9667, 0.9733]}
    lines = stdout.splitlines()
    assert any(line.split()[:2] == ["trainable", "parameters"] and f"{expected:,}" in line and "2,666,528" in line
               for line in lines)
    assert any(line.startswith("test accuracy") and f"{100 * ours['test_accuracy']:.2f}%" in line
               and "96.67-97.33%" in line for line in lines)


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


def test_e2e_script_smoke(tmp_path):
    with open(DATA / "e2e_dev.csv", newline="", encoding="utf-8") as fh:
        dev = [(r["mr"], r["ref"]) for r in csv.DictReader(fh)][:24]
    with open(DATA / "e2e_test.csv", newline="", encoding="utf-8") as fh:
        test = [(r["mr"], r["ref"]) for r in csv.DictReader(fh)]
    mrs = list(dict.fromkeys(mr for mr, _ in test))[:3]
    write_rows(tmp_path / "train.csv", dev)
    write_rows(tmp_path / "test.csv", [row for row in test if row[0] in mrs])
    out = tmp_path / "run"
    stdout, stderr = run_script(
        "reproduce_e2e.sh", "--set", TINY, "--set", f"data.train={tmp_path / 'train.csv'}",
        "--set", f"data.val={tmp_path / 'train.csv'}", "--set", f"data.test={tmp_path / 'test.csv'}",
        "--set", "train.max_steps=3", "--set", f"out_dir={out}",
        TEST_DATA=str(tmp_path / "test.csv"), NUM_BEAMS="4", MAX_NEW_TOKENS="8", METEOR="0")
    assert "not fetching the E2E training set" in stderr
    report = json.loads((out / "reproduction.json").read_text())
    ours, refs_per_mr = report["ours"], [sum(mr == m for m, _ in test) for mr in mrs]
    assert (ours["prompts"], ours["references"]) == (3, sum(refs_per_mr))
    assert report["decoding"] == {"num_beams": 4, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "max_new_tokens": 8}
    assert ours["trainable_parameters"] == tiny_trainable(["attn.q", "attn.v"])
    # the reported scores are those of the written beam-search outputs against every reference, case-insensitive
    lines = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [mr + "\n" for mr in mrs]
    assert [len(x["references"]) for x in lines] == refs_per_mr
    again = generation_metrics([x["prediction"] for x in lines], [x["references"] for x in lines], lowercase=True)
    assert {k: ours[k] for k in ("bleu", "nist", "rouge_l", "cider")} == {k: again[k] for k in ("bleu", "nist", "rouge_l", "cider")}
    assert "meteor" not in ours
    # the CLI's beam search = transformers' generate(num_beams=4, length_penalty=0.9, no_repeat_ngram_size=4) on
    # the merged model, token for token (tests/test_generate.py checks the decoder itself, beam 10 included)
    from transformers import GPT2LMHeadModel

    from lora_cli.tokenizer import EOT_ID, decode, encode

    code, _, err = cli("merge", "--adapter", out / "adapter.safetensors", "--out", tmp_path / "merged")
    assert code == 0, err
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    for line in lines:
        ids = torch.tensor([encode(line["prompt"])])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              num_beams=4, length_penalty=0.9, no_repeat_ngram_size=4,
                              pad_token_id=EOT_ID)[0, ids.shape[1]:].tolist()
        assert decode(new[: new.index(EOT_ID)] if EOT_ID in new else new).strip() == line["prediction"]
    for name, paper in (("BLEU", "70.4"), ("NIST", "8.85"), ("METEOR", "46.8"), ("ROUGE-L", "71.8"), ("CIDEr", "2.53")):
        assert any(line.split()[:1] == [name] and paper in line for line in stdout.splitlines()), name
    assert "393,216" in stdout


def test_reference_trainable_counts():
    """2,666,528 (appendix E on GPT-2 124M) and 393,216 (the paper's E2E setting on GPT-2 Medium): `lora info`
    counts on the meta device, and the E2E config's `lora train --dry-run` prints it (building GPT-2 Medium with
    random weights, ~1.5 GB; the appendix-E dry-run is in test_configs.py)."""
    from lora_cli.info import describe

    assert describe("gpt2", random_init=True, lora_config=CONFIGS / "appendix-e-spam.yaml")["lora"]["trainable"] == 2_666_528
    assert describe("gpt2-medium", random_init=True, lora_config=CONFIGS / "e2e-lora-paper.yaml")["lora"]["trainable"] == 393_216
    code, out, err = cli("train", CONFIGS / "e2e-lora-paper.yaml", "--dry-run", "--set", "model={name: gpt2-medium, init: random}",
                         "--set", f"data.train={DATA / 'e2e_dev.csv'}")
    assert code == 0, err
    assert "trainable parameters: 393,216 of 355,216,384" in out


def test_e2e_config_is_the_papers_setting():
    cfg = load_config(CONFIGS / "e2e-lora-paper.yaml")
    d, lo, t = cfg.data, cfg.lora, cfg.train
    assert cfg.model.name == "gpt2-medium" and cfg.task == "causal_lm"
    assert (lo.r, lo.alpha, lo.dropout, lo.targets) == (4, 32, 0.1, ["attn.q", "attn.v"])
    assert (t.lr, t.weight_decay, t.batch_size, t.grad_accum, t.epochs) == (2e-4, 0.01, 8, 1, 5)
    assert (t.lr_schedule, t.warmup_steps, t.min_lr_ratio, t.label_smoothing, t.max_grad_norm) == ("linear", 500, 0.0, 0.1, None)
    assert (t.betas, t.eps, t.model_dropout, t.seed) == ([0.9, 0.999], 1e-6, 0.0, 110)
    assert (d.format, d.columns, d.prompt_template, d.max_length, d.mask_prompt) == (
        "prompt_completion", {"prompt": "mr", "completion": "ref"}, "{prompt}\n", 512, True)
    assert Path(d.train) == (CONFIGS / ".." / "data" / "e2e" / "trainset.csv").resolve()  # fetched, git-ignored
    assert (Path(d.val).name, Path(d.test).name) == ("e2e_dev.csv", "e2e_test.csv")
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/e2e/trainset.csv"], cwd=ROOT)
    assert ignored.returncode == 0


def test_get_e2e_data_refuses_a_wrong_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "trainset.csv").write_text("mr,ref\nname[X],X.\n")
    done = subprocess.run(["bash", str(SCRIPTS / "get_e2e_data.sh"), str(tmp_path / "dest")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "E2E_DATA_DIR": str(tmp_path / "src")})
    assert done.returncode == 1
    assert "expected f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6" in done.stderr
    assert not (tmp_path / "dest" / "trainset.csv").exists()
