"""Classifiers on the command line: `lora eval` (metrics equal a direct computation, base = LoRA off, --plot),
`lora predict` (arguments, file, stdin, JSON), `lora merge` (transformers' GPT2ForSequenceClassification gives the
same logits), `lora export` (PEFT's GPT2ForSequenceClassification + adapter gives the same logits, the head kept),
the spam config end to end, and bad inputs (one exact line on stderr, no traceback).

Two tiny classifiers are trained once: the head trained in full (modules_to_save) with LoRA on fused c_attn and
c_fc, and the reference's frozen head with LoRA on it, beside q/v slices and c_proj."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lora_cli.adapter import attach_adapter, load_adapter
from lora_cli.pretrained import load_model
from lora_cli.data import Example, collate
from lora_cli.lora import lora_disabled
from lora_cli.loss import class_logits
from lora_cli.tokenizer import EOT_ID, encode

from helpers import assert_one_line_error, cli, make_hf_gpt2

ROOT = Path(__file__).parent.parent
POS = ["great", "lovely", "excellent", "happy", "wonderful"]
NEG = ["awful", "terrible", "horrible", "sad", "dreadful"]
FILLER = ["the", "day", "was", "food", "movie", "really", "quite", "and", "it", "so"]
VARIANTS = {
    "trained-head": "[attn.c_attn, mlp.c_fc]",  # the head joins modules_to_save
    "lora-head": "[attn.q, attn.v, mlp.c_proj, score]",  # frozen random head with LoRA on it (the reference)
}


def rows(n=64, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 2 + i % 3) + [rng.choice(POS if label == "pos" else NEG)] + rng.sample(FILLER, 2)
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls-base")
    make_hf_gpt2(path, seed=3)
    return path


def train_classifier(root: Path, base: Path, targets: str) -> Path:
    from lora_cli.config import load_config
    from lora_cli.train import train

    root.mkdir(parents=True, exist_ok=True)
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows()))
    config = root / "cls.yaml"
    config.write_text(f"""\
model: {base}
task: classification
out_dir: out
data: {{train: data.jsonl, val_split: 0.125, test_split: 0.25, max_length: 32}}
lora: {{r: 4, alpha: 8, dropout: 0.0, targets: {targets}}}
train: {{epochs: 2, batch_size: 8, lr: 2e-2, warmup_steps: 1, eval_every: 0, save_every: 0, log_every: 5, seed: 3}}
""")
    train(load_config(config), log=lambda m: None, progress=False)
    return config


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory, base_dir):
    root = tmp_path_factory.mktemp(request.param)
    config = train_classifier(root, base_dir, VARIANTS[request.param])
    return root, config, root / "out" / "adapter.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir):
    """The trained-head classifier alone, for the tests that need one adapter."""
    root = tmp_path_factory.mktemp("trained")
    config = train_classifier(root, base_dir, VARIANTS["trained-head"])
    return root, config, root / "out" / "adapter.safetensors"


def our_model(base_dir, adapter):
    return attach_adapter(load_model(str(base_dir)), load_adapter(adapter)).eval()


def one_by_one(model, texts, labels=None):
    """Logits [N, K] of each text alone (no padding at all): the reference the batched paths must match."""
    with torch.no_grad():
        return torch.cat([class_logits(model, collate([Example(encode(t), [False] * len(encode(t)), label=0)]))
                          for t in texts])


def direct_metrics(logits, truth, labels):
    """Loss, accuracy, per-class precision / recall / F1, macro-F1 and confusion, computed plainly here."""
    k = len(labels)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(truth)).item()
    predicted = logits.argmax(-1).tolist()
    confusion = [[sum(1 for t, p in zip(truth, predicted) if (t, p) == (i, j)) for j in range(k)] for i in range(k)]
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        col, row = sum(confusion[i][c] for i in range(k)), sum(confusion[c])
        precision, recall = (tp / col if col else 0.0), (tp / row if row else 0.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": row}
    accuracy = sum(confusion[i][i] for i in range(k)) / len(truth)
    return {"loss": loss, "accuracy": accuracy, "macro_f1": sum(v["f1"] for v in per_class.values()) / k,
            "per_class": per_class, "confusion_matrix": confusion}


def test_spam_test_split_file_is_the_configs_test_split():
    """data/sms_spam_test.csv is exactly the test split of configs/spam.yaml (= appendix-e-spam.yaml's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("split", ROOT / "scripts" / "make_spam_test_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text, n = module.test_split_csv(ROOT / "configs" / "spam.yaml")
    assert n == 298 and text == (ROOT / "data" / "sms_spam_test.csv").read_text(encoding="utf-8")
    assert module.test_split_csv(ROOT / "configs" / "appendix-e-spam.yaml")[0] == text


# ------------------------------------------------------------------------------------------------- lora eval


def test_eval_json_equals_a_direct_computation(run, base_dir):
    root, _, adapter = run
    test_csv = root / "out" / "test.csv"
    code, out, err = cli("eval", "--adapter", adapter, "--data", test_csv, "--json", "--batch-size", "3")
    assert code == 0, err
    result = json.loads(out)
    with open(test_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    frame = {column: [row[column] for row in rows] for column in ("text", "label")}
    labels = ["neg", "pos"]
    truth = [labels.index(x) for x in frame["label"]]
    model = our_model(base_dir, adapter)
    want = direct_metrics(one_by_one(model, list(frame["text"])), truth, labels)
    with lora_disabled(model):
        want_base = direct_metrics(one_by_one(model, list(frame["text"])), truth, labels)
    assert result["labels"] == labels and result["examples"] == len(rows) == 16
    for got, expected in ((result, want), (result["base"], want_base)):
        assert got["confusion_matrix"] == expected["confusion_matrix"]
        assert got["accuracy"] == expected["accuracy"]
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        assert got["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
        for name in labels:
            for key in ("precision", "recall", "f1"):
                assert got["per_class"][name][key] == pytest.approx(expected["per_class"][name][key], abs=1e-12)
            assert got["per_class"][name]["support"] == expected["per_class"][name]["support"] == 8
    assert result["base"]["note"] == "the adapter's head on the base model, every LoRA layer off"
    for key in ("loss", "accuracy", "macro_f1"):
        assert result["delta"][key] == pytest.approx(result[key] - result["base"][key], abs=1e-12)
    assert abs(result["loss"] - result["base"]["loss"]) > 1e-4  # switching LoRA off changes the classifier
    # the run's own test split through the config: the same examples, the same numbers
    code, out, err = cli("eval", root / "cls.yaml", "--json", "--no-base")
    assert code == 0, err
    by_config = json.loads(out)
    assert by_config["split"] == "test" and "base" not in by_config
    assert by_config["confusion_matrix"] == result["confusion_matrix"]
    assert by_config["loss"] == pytest.approx(result["loss"], abs=1e-6)


def test_eval_table_and_plot(trained, tmp_path):
    root, _, adapter = trained
    plot = tmp_path / "plots" / "confusion.png"
    code, out, err = cli("eval", "--adapter", adapter, "--data", root / "out" / "test.csv", "--plot", plot)
    assert code == 0, err
    code, js, _ = cli("eval", "--adapter", adapter, "--data", root / "out" / "test.csv", "--json")
    r = json.loads(js)
    b, d = r["base"], r["delta"]
    lines = out.splitlines()
    n, p = r["per_class"]["neg"], r["per_class"]["pos"]
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    assert lines[2:] == [
        "",
        "            base  adapter    delta",
        f"loss      {b['loss']:.4f}   {r['loss']:.4f}  {d['loss']:+.4f}",
        f"accuracy  {b['accuracy']:.4f}   {r['accuracy']:.4f}  {d['accuracy']:+.4f}",
        f"macro-F1  {b['macro_f1']:.4f}   {r['macro_f1']:.4f}  {d['macro_f1']:+.4f}",
        "examples      16       16",
        "",
        "class  precision  recall      F1  support",
        f"neg    {n['precision']:>9.4f}  {n['recall']:>6.4f}  {n['f1']:>6.4f}        8",
        f"pos    {p['precision']:>9.4f}  {p['recall']:>6.4f}  {p['f1']:>6.4f}        8",
        "",
        "confusion matrix (rows: true label, columns: predicted label)",
        "true \\ predicted  neg  pos",
        f"neg               {tn:>3}  {fp:>3}",
        f"pos               {fn:>3}  {tp:>3}",
        "",
        "base: the adapter's head on the base model, every LoRA layer off",
        f"confusion matrix plot written to {plot}",
    ]
    import matplotlib.image

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in plot.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind

    # an existing file is replaced only with --overwrite; a path that cannot be written is refused before the
    # evaluation, in one line (exit 2), with nothing written
    data = ("--adapter", adapter, "--data", root / "out" / "test.csv")
    before, inode = plot.read_bytes(), plot.stat().st_ino
    (tmp_path / "file").write_text("x")
    for target, message in (
            (plot, f"--plot {plot} already exists; choose a new file or pass --overwrite to replace it"),
            (plot.parent, f"--plot {plot.parent} is a directory; name a file to write"),
            (f"{tmp_path / 'plots'}/", f"--plot {tmp_path / 'plots'}/ ends with a slash, so it names a directory; "
                                       "name a file to write"),
            ("-", "--plot -: name a path to write (standard output carries the command's own output)"),
            (tmp_path / "file" / "c.png", f"--plot {tmp_path / 'file' / 'c.png'}: {tmp_path / 'file'} is not a "
                                          "directory; choose another path")):
        unwritable = str(target).endswith("c.png")  # a path that cannot be written: exit 1, as merge's
        line = assert_one_line_error(*cli("eval", *data, "--plot", target), expected_code=1 if unwritable else 2)
        assert line == f"error: {message}"
    assert plot.read_bytes() == before and (tmp_path / "file").read_text() == "x"
    code, _, err = cli("eval", *data, "--plot", plot, "--overwrite", "--no-base")
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_ino != inode  # written anew
    # --overwrite replaces an earlier plot only: never the run's checkpoint or its test data
    for kept in (root / "out" / "checkpoint" / "state.pt", root / "out" / "test.csv"):
        before = kept.read_bytes()
        line = assert_one_line_error(*cli("eval", *data, "--plot", kept, "--overwrite"), expected_code=2)
        if kept.name == "test.csv":
            assert line == f"error: --plot {kept} is the --data file, which this evaluation reads; choose another file"
        else:
            assert line == (f"error: --plot {kept} exists and is not a PNG image; --overwrite replaces only that; "
                            "choose another file")
        assert kept.read_bytes() == before


# ---------------------------------------------------------------------------------------------- lora predict


TEXTS = ["the day was lovely", "so sad and awful, really", "it was a wonderful movie and the food was great"]


def test_predict_arguments_file_stdin_and_json(trained, base_dir, tmp_path):
    root, _, adapter = trained
    model = our_model(base_dir, adapter)
    probs = torch.softmax(one_by_one(model, TEXTS), dim=-1)
    labels = ["neg", "pos"]
    want_lines = [f"{labels[int(p.argmax())]} {float(p.max()):.4f}" for p in probs]

    code, out, err = cli("predict", "--adapter", adapter, *TEXTS, "--batch-size", "2")
    assert code == 0, err
    assert out.splitlines() == want_lines

    (tmp_path / "texts.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\r\n{TEXTS[2]}\n")  # blank line skipped, CRLF
    code, out, err = cli("predict", "--adapter", adapter, "--file", tmp_path / "texts.txt", "--json")
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["text"] for o in objects] == TEXTS
    for o, p in zip(objects, probs):
        assert set(o) == {"text", "label", "probability", "probabilities"}
        assert list(o["probabilities"]) == labels
        for name, v in zip(labels, p.tolist()):
            assert o["probabilities"][name] == pytest.approx(v, abs=1e-6)
        assert o["label"] == labels[int(p.argmax())] and o["probability"] == max(o["probabilities"].values())
        assert sum(o["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)

    for args in ((), ("--file", "-")):  # no texts: stdin; --file -: stdin too
        code, out, err = cli("predict", "--adapter", adapter, *args, stdin="\n".join(TEXTS) + "\n")
        assert code == 0, err
        assert out.splitlines() == want_lines

    for args in ((), ("--file", "-")):  # bytes that are not UTF-8 are refused, as in a file
        line = assert_one_line_error(*cli("predict", "--adapter", adapter, *args, stdin=b"caf\xe9 ok\n"))
        assert line == "error: stdin: not UTF-8 text (byte offset 3); re-save it as UTF-8"

    from lora_cli.predict import load_classifier, predict_texts, prediction_line

    preds = predict_texts(load_classifier(adapter, device="cpu"), TEXTS, batch_size=1)  # the library call
    assert [prediction_line(x) for x in preds] == want_lines

    # --precision bf16: every weight (base, LoRA, head) stored in bf16; probabilities within bf16's rounding
    loaded = load_classifier(adapter, device="cpu", precision="bf16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    for x, p in zip(predict_texts(loaded, TEXTS, batch_size=2), probs):
        assert x.probability == pytest.approx(float(p.max()), abs=0.03) and x.label == labels[int(p.argmax())]


# --------------------------------------------------------------------------------------------------- lora merge


def padded_batch(texts):
    """Right-padded with <|endoftext|> (transformers finds the last token that is not pad_token_id)."""
    examples = [Example(encode(t), [False] * len(encode(t)), label=0) for t in texts]
    return collate(examples, pad_id=EOT_ID, pad_side="right")


def test_merge_loads_in_transformers_with_the_same_logits(run, base_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2ForSequenceClassification

    root, _, adapter = run
    out = tmp_path / "merged"
    code, stdout, err = cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0, err
    assert stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["num_labels"] == 2 and config["pad_token_id"] == EOT_ID
    weights = load_file(str(out / "model.safetensors"))
    assert weights["score.weight"].shape == (2, 64) and "score.base_layer.weight" not in weights
    assert "GPT2ForSequenceClassification.from_pretrained" in (out / "README.md").read_text()

    hf = GPT2ForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    model = our_model(base_dir, adapter)
    batch = padded_batch(TEXTS)
    with torch.no_grad():
        theirs = hf(batch.input_ids, attention_mask=batch.attention_mask).logits
        ours = class_logits(model, batch)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (ours - one_by_one(model, TEXTS)).abs().max().item() <= 1e-5

    # lora-cli reads the merged directory as a GPT-2 body (the head is left out): with the saved score on top it
    # is the merged classifier again.
    body = load_model(str(out)).model.eval()
    assert not hasattr(body, "score")
    with torch.no_grad():
        hidden = body(batch.input_ids)
        from lora_cli.models import last_token_hidden

        again = last_token_hidden(hidden, batch.attention_mask) @ weights["score.weight"].T
    assert (again - ours).abs().max().item() <= 1e-4
    # `lora info` says it is a classifier and what its count leaves out: with the head, transformers' count
    code, stdout, err = cli("info", out, "--json")
    report = json.loads(stdout)
    assert report["classifier"] == {"architecture": "GPT2ForSequenceClassification", "num_labels": 2,
                                    "labels": ["neg", "pos"], "head_parameters": 128}
    assert report["parameters"] + 128 == sum(p.numel() for p in hf.parameters())


# -------------------------------------------------------------------------------------------------- PEFT export


def test_peft_export_keeps_the_head(run, base_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2ForSequenceClassification

    root, _, adapter = run
    code, out, err = cli("export", adapter, tmp_path / "peft")
    assert code == 0, err
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    assert not any(t.endswith("score") for t in cfg["target_modules"])
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    head = saved["base_model.model.score.weight"]
    assert head.shape == (2, 64) and not any(k.startswith("base_model.model.score.") and k != "base_model.model.score.weight"
                                              for k in saved)

    model = our_model(base_dir, adapter)
    if hasattr(model.score, "lora_A"):  # LoRA on the frozen head: exported folded, W + scaling B A
        ours_head = model.score.base_layer.weight + model.score.delta_weight()
        assert (ours_head - model.score.base_layer.weight).abs().max() > 1e-4  # the fold matters
    else:
        ours_head = model.score.weight
    torch.testing.assert_close(head, ours_head, atol=1e-6, rtol=0)

    config = GPT2Config.from_pretrained(base_dir, num_labels=2, pad_token_id=EOT_ID)
    base = GPT2ForSequenceClassification.from_pretrained(base_dir, config=config).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    loaded_head = peft_model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(loaded_head, head)  # the head survives the reload exactly
    batch = padded_batch(TEXTS)
    with torch.no_grad():
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ours = class_logits(model, batch)
    assert (theirs - ours).abs().max().item() <= 1e-5

    # lora-cli reads the export back (label names from the weights file's header): the same classifier
    reloaded = load_adapter(tmp_path / "peft")
    assert reloaded.metadata["task"] == "classification" and reloaded.metadata["data"]["labels"] == ["neg", "pos"]
    again = attach_adapter(load_model(str(base_dir)), reloaded).eval()
    with torch.no_grad():
        assert (class_logits(again, batch) - ours).abs().max().item() <= 1e-5
    code, out, err = cli("predict", "--adapter", tmp_path / "peft", *TEXTS, "--json")
    assert code == 0, err
    for line, want in zip(out.splitlines(), torch.softmax(ours, dim=-1)):
        assert json.loads(line)["probabilities"] == pytest.approx(dict(zip(["neg", "pos"], want.tolist())), abs=1e-5)
    # names in the header that repeat cannot name the classes: the class ids do, as for a PEFT export from elsewhere
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "lora_cli_labels": '["pos", "pos"]'})
    assert load_adapter(tmp_path / "peft").metadata["data"]["labels"] == ["0", "1"]


# ---------------------------------------------------------------------------------------- the spam config e2e


def test_spam_config_trains_and_evaluates(tmp_path, base_dir):
    """configs/spam.yaml on a tiny model: train writes test.csv, `lora eval` scores it, and the committed
    data/sms_spam_test.csv is the same split (same numbers)."""
    run_dir = tmp_path / "spam"
    code, out, err = cli("train", ROOT / "configs" / "spam.yaml", "--set", f"model={base_dir}",
                         "--set", f"out_dir={run_dir}", "--set", "train.max_steps=2", "--set", "data.max_length=128",
                         "--set", "train.eval_every=0", "-q")
    assert code == 0, err
    assert out.strip() == str(run_dir / "adapter.safetensors")
    assert (run_dir / "test.csv").read_text() == (ROOT / "data" / "sms_spam_test.csv").read_text()
    results = []
    for data in (run_dir / "test.csv", ROOT / "data" / "sms_spam_test.csv"):
        code, out, err = cli("eval", "--adapter", run_dir / "adapter.safetensors", "--data", data, "--json",
                             "--no-base", "--batch-size", "32")
        assert code == 0, err
        results.append(json.loads(out))
    # The same split as a header-less TSV (as data/sms_spam.tsv is), and through the run config, whose data has
    # no header row while the test.csv that train wrote has one.
    with open(run_dir / "test.csv", newline="") as f:
        headerless = tmp_path / "test.tsv"
        headerless.write_text("".join(f"{row['label']}\t{row['text']}\n" for row in csv.DictReader(f)))
    for args in (("--adapter", run_dir / "adapter.safetensors", "--data", headerless, "--no-header",
                  "--column-names", "label,text"),
                 (ROOT / "configs" / "spam.yaml", "--set", f"model={base_dir}", "--set", f"out_dir={run_dir}",
                  "--data", run_dir / "test.csv")):
        code, out, err = cli("eval", *args, "--json", "--no-base", "--batch-size", "32")
        assert code == 0, err
        results.append(json.loads(out))
    a, b, c, d = results
    assert c["confusion_matrix"] == d["confusion_matrix"] == a["confusion_matrix"]
    assert c["loss"] == d["loss"] == a["loss"]
    assert a["examples"] == 298 and a["labels"] == ["ham", "spam"]
    assert a["per_class"]["ham"]["support"] == a["per_class"]["spam"]["support"] == 149
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["loss"] == b["loss"]
    assert math.isfinite(a["loss"])


# ------------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_exact_line(trained, base_dir, tmp_path):
    root, _, adapter = trained
    cases = []
    one_class = tmp_path / "one-class.csv"
    one_class.write_text("text,label\ngood day,pos\nnice one,pos\nlovely,pos\n")
    (tmp_path / "one.yaml").write_text(f"model: {base_dir}\ntask: classification\nout_dir: {tmp_path / 'o'}\n"
                                       f"data: {{train: {one_class}, max_length: 64}}\n")
    cases.append((("train", tmp_path / "one.yaml"), 1,
                  f"error: {one_class}: the label column 'label' has only one class ('pos'); classification needs at "
                  "least two classes"))
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\ngood day,pos\nbad day,neg\nso so,meh\nfine,meh\nokay,whatever\n")
    cases.append((("eval", "--adapter", adapter, "--data", unknown), 1,
                  f"error: {unknown}: row 3 (line 4): label 'meh' is not one of adapter {adapter}'s labels ('neg', "
                  "'pos'); 2 more rows have unknown labels ('whatever'); fix or drop those rows"))
    foreign = tmp_path / "spam.csv"
    foreign.write_text("text,label\nwin cash,spam\nsee you,ham\n")
    cases.append((("eval", "--adapter", adapter, "--data", foreign), 1,
                  f"error: {foreign}: none of its labels ('ham', 'spam') is one of adapter {adapter}'s labels "
                  "('neg', 'pos'); evaluate with the adapter trained on these labels"))
    no_text = tmp_path / "no-text.csv"
    no_text.write_text("text,label\ngood day,pos\n,neg\n")
    cases.append((("eval", "--adapter", adapter, "--data", no_text), 1,
                  f"error: {no_text}: row 2 (line 3): column 'text' is empty; fill it in or pass --skip-bad-rows to "
                  "skip such rows"))
    headerless = tmp_path / "headerless.tsv"
    headerless.write_text("pos\tgood day\nneg\tbad day\n")
    cases.append((("eval", "--adapter", adapter, "--data", headerless), 1,
                  f"error: {headerless}: format classification needs a column for 'text' but there is no column "
                  "'text'; the file's columns are: pos, good day; map one with --column text=<column> (a file "
                  "without a header row: --no-header --column-names NAME,NAME,...)"))
    cases.append((("eval", "--adapter", adapter, "--data", headerless, "--no-header"), 2,
                  "error: --no-header needs --column-names NAME,NAME,... (one name per column, e.g. --column-names "
                  "label,text)"))
    cases.append((("eval", "--adapter", adapter, "--data", headerless, "--no-header", "--column-names", "label,"), 2,
                  "error: --column-names: expected NAME,NAME,... with no empty name, got 'label,'"))
    cases.append((("eval", root / "cls.yaml", "--no-header"), 2,
                  "error: --no-header describes the file --data names; pass --data FILE (a run config's own files are "
                  "read with its data.header and data.column_names)"))
    cases.append((("eval", "--adapter", adapter, "--data", headerless, "--format", "text"), 2,
                  "error: --format text: a classifier reads a text and a label column, not another format; leave out "
                  "--format and map the columns with --column text=COLUMN --column label=COLUMN"))
    cases.append((("eval", "--adapter", adapter, "--data", headerless, "--prompt-template", "Review: {text}"), 2,
                  "error: --prompt-template: a classifier reads its text column as it is, with no prompt; leave out "
                  "--prompt-template"))
    cases.append((("eval", "--adapter", adapter, "--data", root / "data.jsonl", "--generate"), 2,
                  "error: --generate is for causal-LM adapters; this adapter is a classifier"))
    cases.append((("predict", "--adapter", adapter, "fine", "  "), 1,
                  "error: text 2 is empty; give some text to classify"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases.append((("predict", "--adapter", adapter, "--file", empty), 1,
                  f"error: {empty} holds no texts (it is empty or blank); write one text per line"))
    cases.append((("predict", "--adapter", adapter, "hi", "--file", empty), 2,
                  "error: give texts as arguments or with --file, not both"))
    cases.append((("predict", "--adapter", adapter, "--file", tmp_path), 1,
                  f"error: --file {tmp_path} is a directory; pass a text file with one text per line"))
    # a causal-LM adapter: predict and --plot refuse it
    from lora_cli.adapter import save_adapter
    from lora_cli.config import LoraConfig
    from lora_cli.lora import apply_lora

    base = load_model(str(base_dir))
    apply_lora(base.model, LoraConfig(r=2, alpha=4, targets=["attn.c_attn"]))
    lm = save_adapter(tmp_path / "lm.safetensors", base.model, {"base_model": base.describe(), "task": "causal_lm"})
    cases.append((("predict", "--adapter", lm, "hello"), 2,
                  f"error: adapter {lm} is a causal_lm adapter, not a classifier; `lora predict` needs one trained "
                  "with task: classification (use `lora generate` for text)"))
    cases.append((("eval", "--adapter", lm, "--data", root / "data.jsonl", "--plot", tmp_path / "x.png"), 2,
                  "error: --plot draws a classifier's confusion matrix; this is not a classification adapter"))
    for args, want_code, want in cases:
        code, out, err = cli(*args)
        assert assert_one_line_error(code, out, err, want_code) == want
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.png").exists()
    # what the hint says works: the empty row is skipped, the other evaluated
    code, out, err = cli("eval", "--adapter", adapter, "--data", no_text, "--skip-bad-rows", "--json", "--no-base")
    assert code == 0, err
    assert json.loads(out)["examples"] == 1
