"""`lora eval`: loss parity with transformers + PEFT, run configs, the base model alone, generation metrics with
several references per prompt, and bad inputs."""

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lora_cli.config import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT
from lora_cli.metrics import generation_metrics
from lora_cli.tokenizer import EOT_ID, decode, encode

from helpers import TINY, alpaca_rows, assert_one_line_error, cli, make_hf_gpt2, train_run

peft = pytest.importorskip("peft")

HELDOUT = alpaca_rows(["orange", "violet", "silver", "winter", "garden"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_hf_gpt2(root / "base", seed=0)
    make_hf_gpt2(root / "other", seed=1)
    config = train_run(root, root / "base")
    (root / "heldout.json").write_text(json.dumps(HELDOUT))
    return root, config, root / "out" / "adapter.safetensors"


def eval_json(*args):
    code, out, err = cli("eval", *args, "--json", "--device", "cpu")  # fp32 on any machine: exact comparisons
    assert code == 0, err
    return json.loads(out)


def reference_metrics(model, rows):
    """Token-weighted mean cross-entropy and next-token accuracy over the response + EOT tokens, computed on a
    transformers model one example at a time with the prompt template and masking written out here."""
    loss_sum, correct, tokens = 0.0, 0, 0
    for row in rows:
        template = ALPACA_TEMPLATE if row["input"] else ALPACA_TEMPLATE_NO_INPUT
        prompt = encode(template.format(**row))
        ids = torch.tensor([prompt + encode(row["output"]) + [EOT_ID]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        targets = ids[0, 1:]
        scored = slice(len(prompt) - 1, None)  # position i predicts token i+1: the response starts at len(prompt)
        loss_sum += F.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        correct += (logits[scored].argmax(-1) == targets[scored]).sum().item()
        tokens += targets[scored].numel()
    return loss_sum / tokens, correct / tokens, tokens


def test_eval_loss_equals_transformers_peft_reference(run, tmp_path):
    from transformers import GPT2LMHeadModel

    root, _, adapter = run
    result = eval_json("--adapter", adapter, "--data", root / "heldout.json")
    hf = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    base_loss, base_acc, n = reference_metrics(hf, HELDOUT)
    code, out, err = cli("export", adapter, tmp_path / "peft")
    assert code == 0, err
    tuned = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "peft")).eval()
    loss, acc, _ = reference_metrics(tuned, HELDOUT)

    assert result["examples"] == result["base"]["examples"] == len(HELDOUT)
    assert result["tokens"] == result["base"]["tokens"] == n
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["base"]["loss"] == pytest.approx(base_loss, rel=1e-4)
    assert abs(result["loss"] - result["base"]["loss"]) > 1e-3  # the adapter changed something measurable
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["token_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert result["base"]["token_accuracy"] == pytest.approx(base_acc, abs=1e-9)
    assert result["delta"]["loss"] == pytest.approx(result["loss"] - result["base"]["loss"])

    # The table shows both columns and the delta.
    code, out, err = cli("eval", "--adapter", adapter, "--data", root / "heldout.json", "--device", "cpu")
    assert code == 0, err
    assert ["base", "adapter", "delta"] in [line.split() for line in out.splitlines()]
    loss_row = next(line for line in out.splitlines() if line.startswith("loss"))
    assert loss_row.split()[1:] == [f"{result['base']['loss']:.4f}", f"{result['loss']:.4f}",
                                    f"{result['delta']['loss']:+.4f}"]


def test_eval_config_reproduces_training_validation(run, tmp_path):
    from safetensors import safe_open

    root, config, adapter = run
    with safe_open(str(adapter), "pt") as f:
        best = json.loads(f.metadata()["training"])["best_val_loss"]
    result = eval_json(config)
    assert result["split"] == "val" and result["examples"] == 3  # 12 rows, val_split 0.25
    assert result["loss"] == pytest.approx(best, rel=1e-6)
    # data.test set: the test split is evaluated, with the same numbers as --data on that file
    as_test = eval_json(config, "--set", f"data.test={root / 'heldout.json'}", "--no-base")
    direct = eval_json("--adapter", adapter, "--data", root / "heldout.json", "--no-base")
    assert as_test["split"] == "test" and "base" not in as_test
    assert as_test["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_base_model_alone(run):
    root, _, adapter = run
    alone = eval_json("--model", root / "base", "--data", root / "heldout.json", "--format", "alpaca")
    paired = eval_json("--adapter", adapter, "--data", root / "heldout.json")
    assert "base" not in alone and alone["adapter"] is None
    assert {k: alone[k] for k in paired["base"]} == pytest.approx(paired["base"], rel=1e-6)


def test_generation_metrics_hand_computed():
    hyps = ["a b c d e", "p q r s", "k l m n"]
    refs = [["a b c d x", "y b c d e"], ["p q r s"], ["k l m z"]]
    m = generation_metrics(hyps, refs)
    # "a b c d e" matches no reference alone, but every n-gram is in one of the two: multi-reference counts.
    # Corpus n-gram precisions 12/13, 9/10, 6/7, 3/4; hypothesis and closest reference lengths are equal (BP 1).
    assert m["bleu"] == pytest.approx(100 * ((12 / 13) * (9 / 10) * (6 / 7) * (3 / 4)) ** 0.25, abs=1e-9)
    # ROUGE-L F: best reference per prompt (LCS 4 of 5 -> 0.8), 1.0, 0.75
    assert m["rouge_l"] == pytest.approx(100 * (0.8 + 1.0 + 0.75) / 3, abs=1e-9)
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert (m["prompts"], m["references"]) == (3, 4)


def write_e2e(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


def test_generate_groups_references_per_prompt(run, tmp_path):
    from lora_cli.pretrained import load_model
    from lora_cli.generate import generate

    root, _, _ = run
    mrs = ["name[The Vaults], eatType[pub]", "name[Blue Spice], area[city centre]", "name[Zizzi], food[Italian]"]
    rows = [(mrs[0], "The Vaults is a pub."), (mrs[1], "Blue Spice is in the city centre."), (mrs[0], "A pub: The Vaults."),
            (mrs[2], "Zizzi serves Italian food."), (mrs[0], "There is a pub called The Vaults."),
            (mrs[1], "In the city centre is Blue Spice.")]
    write_e2e(tmp_path / "e2e.csv", rows)
    preds = tmp_path / "preds.jsonl"
    result = eval_json("--model", root / "base", "--data", tmp_path / "e2e.csv", "--format", "prompt_completion",
                       "--column", "prompt=mr", "--column", "completion=ref", "--generate", "--max-new-tokens", "6",
                       "--batch-size", "2", "--predictions", preds)
    gen = result["generation"]
    assert (gen["prompts"], gen["references"], result["examples"]) == (3, 6, 6)
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [m + "\n" for m in mrs]  # first-seen order, the training template
    assert [len(x["references"]) for x in lines] == [3, 2, 1]
    # greedy outputs = generate() on the same prompts; the metrics are those of the written predictions
    model = load_model(str(root / "base")).model.eval()
    expected = generate(model, [encode(m + "\n") for m in mrs], 6)
    assert [x["prediction"] for x in lines] == [decode(t).strip() for t in expected]
    again = generation_metrics([x["prediction"] for x in lines], [x["references"] for x in lines])
    assert {k: gen[k] for k in again} == again
    # the file now exists: replaced only with --overwrite, refused before any decoding without it
    written = preds.read_text()
    args = ("eval", "--model", root / "base", "--data", tmp_path / "e2e.csv", "--format", "prompt_completion",
            "--column", "prompt=mr", "--column", "completion=ref", "--generate", "--max-new-tokens", "6",
            "--predictions", preds)
    line = assert_one_line_error(*cli(*args), expected_code=2)
    assert line == f"error: --predictions {preds} already exists; choose a new file or pass --overwrite to replace it"
    assert preds.read_text() == written
    code, _, err = cli(*args, "--overwrite", "--batch-size", "2", "--json")
    assert code == 0, err
    assert preds.read_text() == written  # the same greedy outputs, written again
    # --overwrite replaces earlier predictions only (or an empty file), not another file kept there
    notes = tmp_path / "notes.jsonl"
    for text, replaced in (('{"prompt": "p", "label": 1}\n', False), ("plain text\n", False),
                           ("\nmy notes\n", False), ("", True)):
        notes.write_text(text)
        code, _, err = cli(*args[:-1], notes, "--overwrite", "--batch-size", "2")
        if replaced:
            assert code == 0, err
            assert notes.read_text() == written
        else:
            assert (code, err.strip()) == (2, f"error: --predictions {notes} exists and is not a predictions file (a "
                                              "JSONL of prompt, prediction, references); --overwrite replaces only "
                                              "that; choose another file")
            assert notes.read_text() == text
    # never over a file the evaluation reads, even with --overwrite: the data, the adapter (file or directory)
    data = (tmp_path / "e2e.csv").read_bytes()
    line = assert_one_line_error(*cli(*args[:-1], tmp_path / "e2e.csv", "--overwrite"), expected_code=2)
    assert line == (f"error: --predictions {tmp_path / 'e2e.csv'} is the --data file, which this evaluation reads; "
                    "choose another file")
    assert (tmp_path / "e2e.csv").read_bytes() == data
    adapter = root / "out" / "adapter.safetensors"
    for given in (adapter, adapter.parent):
        line = assert_one_line_error(*cli("eval", "--adapter", given, "--data", root / "heldout.json", "--generate",
                                          "--predictions", adapter, "--overwrite"), expected_code=2)
        what = "the adapter" if given == adapter else "a file of the adapter"
        assert line == f"error: --predictions {adapter} is {what}, which this evaluation reads; choose another file"


def test_bad_inputs_one_line_and_nothing_written(run, tmp_path):
    root, _, adapter = run
    # an adapter whose shapes do not fit the base (--allow-mismatch passes the fingerprint): the misfit alone, before
    # the data is read and described (it was a second line after the data's)
    make_hf_gpt2(tmp_path / "wide", seed=0, n_embd=2 * TINY["n_embd"])
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--model", tmp_path / "wide", "--data",
                                      root / "heldout.json", "--allow-mismatch"))
    assert line.startswith(f"error: adapter {adapter} does not fit base model {tmp_path / 'wide'}: ")
    # an adapter for another base (fingerprint mismatch)
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--model", root / "other", "--data",
                                      root / "heldout.json"))
    assert "fingerprint" in line and "--allow-mismatch" in line
    # --generate on data without the reference column
    (tmp_path / "norefs.csv").write_text('mr\n"name[A]"\n')
    preds = tmp_path / "preds.jsonl"
    line = assert_one_line_error(*cli("eval", "--model", root / "base", "--data", tmp_path / "norefs.csv",
                                      "--column", "prompt=mr", "--column", "completion=ref", "--generate",
                                      "--predictions", preds))
    assert line == (f"error: {tmp_path / 'norefs.csv'}: --generate needs the reference column 'ref' (the completion "
                    "of format prompt_completion) to score generations against; the file's columns are: mr; add it or "
                    "name it with --column completion=COLUMN")
    assert not preds.exists()
    # --max-new-tokens that leave no room for a prompt: refused before the data is read (and described)
    n_positions = json.loads((root / "base" / "config.json").read_text())["n_positions"]
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", root / "heldout.json", "--generate",
                                      "--max-new-tokens", n_positions, "-q"), expected_code=2)
    assert line == (f"error: --max-new-tokens {n_positions} leaves no room for a prompt in the model's context of "
                    f"{n_positions} tokens; lower --max-new-tokens below {n_positions}")
    # nothing to evaluate
    assert_one_line_error(*cli("eval", "--data", root / "heldout.json"), expected_code=2)
    # a run whose adapter does not exist yet
    line = assert_one_line_error(*cli("eval", root / "run.yaml", "--set", f"out_dir={tmp_path / 'nowhere'}"))
    assert "no adapter at" in line


def test_flags_that_would_be_ignored_are_refused(run, tmp_path):
    root, _, adapter = run
    data = root / "heldout.json"
    for flags, want in (
        (("--predictions", tmp_path / "p.jsonl"), "error: --predictions is for generation: add --generate"),
        (("--num-beams", "4"), "error: --num-beams is for generation: add --generate"),
        (("--lowercase",), "error: --lowercase scores generated text: add --generate"),
        (("--max-new-tokens", "8"), "error: --max-new-tokens is for generation: add --generate"),
        (("--no-header", "--column-names", "a,b"), f"error: --no-header describes a CSV or TSV file's columns; {data} "
                                                   "is not one"),
        (("--format", "classification"),
         "error: --format classification is a classifier's data (text and label columns); this adapter is a causal "
         "LM: name its data's format (alpaca, prompt_completion, chat, text) or leave out --format"),
    ):
        assert assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", data, *flags),
                                     expected_code=2) == want
    assert not (tmp_path / "p.jsonl").exists()
    # a --data path is read from the current folder, and the message says so
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", "missing.json", cwd=tmp_path))
    assert line == (f"error: --data: missing.json does not exist; check the path (a relative path is read from the "
                    f"current folder, {tmp_path})")


def test_predictions_written_meanwhile_by_another_command_are_kept(run, tmp_path):
    """--predictions is checked before the evaluation and again before it is written: a file another command wrote
    there in the meantime is not replaced without --overwrite (the data's summary line, logged after the first
    check, stands in for that other command here)."""
    from lora_cli.errors import ConfigError
    from lora_cli.evaluate import EvalOptions, run_eval

    root, _, adapter = run
    preds = tmp_path / "preds.jsonl"

    def other_command(message):
        preds.write_text("theirs\n")

    options = EvalOptions(adapter=adapter, data=str(root / "heldout.json"), generate=True, max_new_tokens=2,
                          predictions=preds, compare_base=False, device="cpu")
    with pytest.raises(ConfigError) as err:
        run_eval(options, log=other_command)
    assert str(err.value) == f"--predictions {preds} already exists; choose a new file or pass --overwrite to replace it"
    assert preds.read_text() == "theirs\n"


def test_json_output_stays_json_when_the_model_gives_nan(run, tmp_path):
    """A checkpoint with a NaN weight evaluates to a NaN loss: --json writes null for it (Python's NaN and
    Infinity are not JSON, and other tools refuse them), the table writes nan."""
    from safetensors.torch import load_file, save_file

    root, _, _ = run
    model = make_hf_gpt2(tmp_path / "nan")
    weights = load_file(str(tmp_path / "nan" / "model.safetensors"))
    weights["transformer.ln_f.weight"][0] = float("nan")
    save_file(weights, str(tmp_path / "nan" / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = cli("eval", "--model", tmp_path / "nan", "--data", root / "heldout.json", "--json", "-q")
    assert code == 0, err

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    result = json.loads(out, parse_constant=refuse)
    assert result["loss"] is None and result["perplexity"] is None
    code, out, err = cli("eval", "--model", tmp_path / "nan", "--data", root / "heldout.json", "-q")
    assert code == 0 and "nan" in out, err


def test_split_and_subset_of_a_data_file_are_refused(run):
    """A data file has no splits or configurations: --split / --subset would be ignored without a word."""
    root, _, adapter = run
    for flag in ("--split", "--subset"):
        line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", root / "heldout.json", flag, "x"),
                                     expected_code=2)
        assert line == (f"error: {flag} picks from a hub dataset (hf://datasets/...) or a saved dataset folder, and "
                        f"--data {root / 'heldout.json'} is a file; leave out {flag}")


def test_max_length_above_the_context_is_refused(run):
    """--max-length past the model's context was cut to it without a word (and long data then asked to raise
    data.max_length, which could not be done)."""
    root, _, adapter = run
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", root / "heldout.json", "--max-length",
                                      "100000"), expected_code=2)
    assert line == (f"error: --max-length 100000 is above the model's context (n_positions = {TINY['n_positions']}); "
                    f"pass at most {TINY['n_positions']}")


def test_a_text_files_test_split_is_said_to_be_held_out_and_evaluates_by_its_config(tmp_path):
    """A .txt file's examples are chunks, not rows a file could hold: its test split is held out without a file,
    which the run now says (it held them out without a word), and `lora eval CONFIG` evaluates it."""
    (tmp_path / "book.txt").write_text("A plain text file to learn from, read in chunks of tokens. " * 40)
    (tmp_path / "run.yaml").write_text(
        "model: {name: gpt2, init: random, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}\nout_dir: out\n"
        "data: {train: book.txt, max_length: 32, test_split: 0.25}\n"
        "train: {max_steps: 1, batch_size: 4, eval_every: 0, save_every: 0}\n")
    code, _, err = cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path)
    assert code == 0, err
    config = tmp_path / "out" / "config.yaml"
    line = next(line for line in err.splitlines() if line.startswith("test split"))
    chunks = int(line.split()[2].lstrip("("))
    assert line == (f"test split ({chunks} chunks of {tmp_path / 'book.txt'}) held out, not written to a file: "
                    f"`lora eval {config}` evaluates it") and chunks > 0
    assert not list((tmp_path / "out").glob("test.*"))
    result = json.loads(cli("eval", config, "--json", "-q").stdout)
    assert result["examples"] == chunks and result["split"] == "test"
