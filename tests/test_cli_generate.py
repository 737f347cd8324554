"""`lora generate`: the adapter's template, streaming, files and JSONL, the KV cache against recomputation and
against transformers' generate on the merged model, sampling seeds, and bad inputs."""

import json

import pytest
import torch

from lora_cli.adapter import attach_adapter
from lora_cli.pretrained import load_model
from lora_cli.config import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT
from lora_cli.generate import generate
from lora_cli.prompts import escape_line
from lora_cli.tokenizer import EOT_ID, decode, encode

from helpers import assert_one_line_error, child_env, cli, make_hf_gpt2, make_lively, train_run

INSTRUCTIONS = ["Repeat the word orange.", "Name a color.", "Write one short sentence about rivers and stones."]
N = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    make_lively(root / "base")
    train_run(root, root / "base", steps=3, lr=1e-3)  # a light touch: outputs vary and some end in EOT
    adapter = root / "out" / "adapter.safetensors"
    model = attach_adapter(load_model(str(root / "base")), adapter).eval()
    return root, adapter, model


def gen(*args):
    """`lora generate` on the CPU, where the in-process model runs too (the same tokens on any machine)."""
    return cli("generate", *args, "--device", "cpu")


def expected(model, prompts, n=N, **options):
    return [decode(t) for t in generate(model, [encode(p) for p in prompts], n, **options)]


def test_single_prompt_streams_with_the_template(run):
    root, adapter, model = run
    code, out, err = gen("--adapter", adapter, INSTRUCTIONS[0], "--max-new-tokens", N)
    assert code == 0, err
    prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=INSTRUCTIONS[0])
    assert out == expected(model, [prompt])[0] + "\n"
    # --input fills the Input block; --no-template feeds the text as it is
    code, out, err = gen("--adapter", adapter, INSTRUCTIONS[0], "--input", "twice", "--max-new-tokens", N)
    assert out == expected(model, [ALPACA_TEMPLATE.format(instruction=INSTRUCTIONS[0], input="twice")])[0] + "\n"
    code, out, err = gen("--adapter", adapter, INSTRUCTIONS[0], "--no-template", "--max-new-tokens", N)
    assert out == expected(model, [INSTRUCTIONS[0]])[0] + "\n"


def test_no_template_json_takes_a_prompt_field_for_an_alpaca_adapter(run, tmp_path):
    """--no-template --json feeds each object's text as it is: its "prompt" (else "text", else "instruction")
    field, whatever the adapter's format; before, an alpaca adapter demanded an "instruction" field."""
    root, adapter, model = run
    rows = [{"prompt": INSTRUCTIONS[0]}, {"text": INSTRUCTIONS[1]}, {"instruction": INSTRUCTIONS[2]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = gen("--adapter", adapter, "--file", tmp_path / "p.jsonl", "--json", "--no-template",
                         "--max-new-tokens", N)
    assert code == 0, err
    got = [json.loads(line)["generated"] for line in out.splitlines()]
    assert got == expected(model, INSTRUCTIONS[:3])
    (tmp_path / "bad.jsonl").write_text('{"input": "x"}\n')
    code, out, err = gen("--adapter", adapter, "--file", tmp_path / "bad.jsonl", "--json", "--no-template")
    assert code == 1 and err == f'error: {tmp_path / "bad.jsonl"} line 1: the object has no "prompt" field; write ' \
        'e.g. {"prompt": "..."}\n'


def test_cache_recompute_and_transformers_on_the_merge_agree(run, tmp_path):
    """KV-cached greedy == recomputing the whole sequence each step == transformers' generate(do_sample=False) on
    the merged model, token for token (compared as ids: decode(encode(x)) round trips for these outputs)."""
    from transformers import GPT2LMHeadModel

    root, adapter, model = run
    prompts = [ALPACA_TEMPLATE_NO_INPUT.format(instruction=i) for i in INSTRUCTIONS]
    (tmp_path / "prompts.txt").write_text("\n".join(INSTRUCTIONS) + "\n")
    outputs = {}
    for flag in ([], ["--no-cache"]):
        code, out, err = gen("--adapter", adapter, "--file", tmp_path / "prompts.txt",
                             "--max-new-tokens", N, "--batch-size", 2, *flag)
        assert code == 0, err
        outputs[bool(flag)] = out.splitlines()
    assert outputs[True] == outputs[False] and len(outputs[False]) == 3
    ours = generate(model, [encode(p) for p in prompts], N)
    assert outputs[False] == [escape_line(decode(t)) for t in ours]

    code, _, err = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    for prompt, mine in zip(prompts, ours):
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                              pad_token_id=EOT_ID)[0, ids.shape[1]:].tolist()
        assert (new[: new.index(EOT_ID)] if EOT_ID in new else new) == mine
    assert any(len(t) < N for t in ours) and len({tuple(t) for t in ours}) == 3  # EOT stops, outputs differ


def test_jsonl_in_and_out_and_beam_search(run, tmp_path):
    root, adapter, model = run
    records = [{"instruction": INSTRUCTIONS[1], "id": 7}, {"instruction": INSTRUCTIONS[2], "input": "twice"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    code, out, err = gen("--adapter", adapter, "--file", tmp_path / "p.jsonl", "--json",
                         "--max-new-tokens", 12, "--num-beams", 3, "--no-repeat-ngram-size", 2)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    prompts = [ALPACA_TEMPLATE_NO_INPUT.format(instruction=INSTRUCTIONS[1]),
               ALPACA_TEMPLATE.format(instruction=INSTRUCTIONS[2], input="twice")]
    beams = expected(model, prompts, 12, num_beams=3, no_repeat_ngram_size=2)
    assert lines == [{**r, "generated": g} for r, g in zip(records, beams)]


def test_a_file_flag_expands_the_home_folder(run, tmp_path):
    """`--file "~/prompts.txt"` (quoted, so the shell leaves the ~) reads from the home folder, as --adapter and
    --model do (it was "does not exist")."""
    root, adapter, _ = run
    (tmp_path / "prompts.txt").write_text("Say something.\n")
    env = {**child_env(), "HOME": str(tmp_path)}
    args = ("generate", "--adapter", adapter, "--max-new-tokens", 4, "-q")
    home = cli(*args, "--file", "~/prompts.txt", env=env)
    assert home.rc == 0, home.stderr
    assert home.stdout == cli(*args, "--file", tmp_path / "prompts.txt", env=env).stdout != ""


def test_sampling_is_seeded(run):
    root, adapter, _ = run
    args = ("--adapter", adapter, "Say something.", "--max-new-tokens", 16, "--temperature", 0.9, "--top-k", 50)
    first, second, other = gen(*args, "--seed", 1), gen(*args, "--seed", 1), gen(*args, "--seed", 2)
    assert first[0] == 0 and first[1] == second[1] and first[1] != other[1]


def test_bad_inputs(run, tmp_path):
    root, adapter, _ = run
    (tmp_path / "empty.txt").write_text("\n  \n")
    line = assert_one_line_error(*gen("--adapter", adapter, "--file", tmp_path / "empty.txt"))
    assert line == f"error: --file {tmp_path / 'empty.txt'} holds no prompts (it is empty or blank); write one prompt per line"
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\n{"instruction": \n')
    line = assert_one_line_error(*gen("--adapter", adapter, "--file", tmp_path / "bad.jsonl", "--json"))
    assert f"{tmp_path / 'bad.jsonl'} line 2 is not valid JSON" in line
    # a key named twice (json would keep the last value), a field that is no text (it was fed as Python's repr)
    (tmp_path / "twice.jsonl").write_text('{"instruction": "a", "instruction": "b"}\n')
    line = assert_one_line_error(*gen("--adapter", adapter, "--file", tmp_path / "twice.jsonl", "--json"))
    assert line == (f"error: {tmp_path / 'twice.jsonl'} line 1 names the key 'instruction' twice, and only one "
                    f"value can be read; remove or rename one of them")
    (tmp_path / "nested.jsonl").write_text('{"instruction": {"a": 1}, "meta": {"kept": true}}\n')
    line = assert_one_line_error(*gen("--adapter", adapter, "--file", tmp_path / "nested.jsonl", "--json"))
    assert line == (f"error: {tmp_path / 'nested.jsonl'} line 1: the field 'instruction' holds a JSON object, not "
                    f"text; write its text")
    (tmp_path / "half.jsonl").write_text('{"instruction": "a \\udfff"}\n')  # no character: writing it failed
    line = assert_one_line_error(*gen("--adapter", adapter, "--file", tmp_path / "half.jsonl", "--json"))
    assert line == (f"error: {tmp_path / 'half.jsonl'} line 1 holds the escape \\udfff, half of a UTF-16 surrogate "
                    "pair, which is no character; write the character itself, or both halves of its pair")
    line = assert_one_line_error(*gen("--adapter", adapter, "--chat", "[" * 5000 + "]" * 5000), expected_code=2)
    assert line == ("error: --chat: a value is nested too deeply to read (over a thousand lists or objects inside "
                    "each other); flatten it")
    twice = '[{"role": "user", "content": "a", "content": "b"}]'
    line = assert_one_line_error(*gen("--adapter", adapter, "--chat", twice), expected_code=2)
    assert line == ("error: --chat: an object names the key 'content' twice, and only one value can be read; remove "
                    "or rename one of them")
    assert_one_line_error(*gen("--adapter", adapter), expected_code=2)  # no prompt
    assert_one_line_error(*gen("Hi"), expected_code=2)  # no model
    assert_one_line_error(*gen("--adapter", adapter, "Hi", "--greedy", "--temperature", 0.5),
                          expected_code=2)
    line = assert_one_line_error(*gen("--adapter", adapter, "Hi", "--max-new-tokens", 500),
                                 expected_code=2)
    assert "--max-new-tokens 500 leaves no room" in line
    # flags that would be dropped without a word
    base = root / "base"
    for args, want in (
        (("--adapter", adapter, "Hi", "--no-template", "--input", "x"),
         "error: --input fills the adapter's prompt template, which --no-template leaves out; drop one of them (or "
         "write the input into the prompt)"),
        (("--model", base, "Hi", "--input", "x"),
         "error: --input is the Input block of an alpaca adapter's prompt, and no alpaca prompt template applies "
         "here; write the input into the prompt"),
        (("--model", base, "Hi", "--chat-template", "chatml"),
         "error: --chat-template renders a --chat conversation: add --chat (and give the conversation as JSON)"),
        (("--model", base, "Hi", "--length-penalty", "2"),
         "error: --length-penalty scores beam search's hypotheses: add --num-beams N (N > 1) or drop --length-penalty"),
        (("--model", base, "Hi", "--num-beams", "2", "--top-k", "3"),
         "error: --top-k is for sampling, and beam search does not sample: drop --top-k or --num-beams"),
        (("--model", base, "Hi", "--num-beams", "2", "--seed", "3"),
         "error: --seed is for sampling, and beam search does not sample: drop --seed or --num-beams"),
        (("--model", base, "Hi", "--seed", "3"),
         "error: --seed seeds sampling, and this decoding is greedy: add --temperature T (T > 0), --top-k or "
         "--top-p, or drop --seed"),
        (("--model", base, '[{"role": "user", "content": "Hi"}]', "--chat", "--input", "x"),
         "error: --chat renders the conversation with the chat template: drop --input"),
        (("--model", base, '[{"role": "user", "content": "Hi"}]', "--chat", "--no-template"),
         "error: --chat renders the conversation with the chat template: drop --no-template"),
        (("--model", base, '[{"role": "user", "content": "Hi"}]', "--chat", "--batch-size", "0"),
         "error: --batch-size must be a positive integer, got 0"),
        # the flags named as typed (the decoder's checks said num_beams and length_penalty)
        (("--model", base, "Hi", "--num-beams", "0"), "error: --num-beams must be a positive integer, got 0"),
        (("--model", base, "Hi", "--num-beams", "2", "--length-penalty", "nan"),
         "error: --length-penalty must be a finite number, got nan"),
    ):
        assert assert_one_line_error(*gen(*args), expected_code=2) == want
    make_hf_gpt2(tmp_path / "other", seed=4)
    line = assert_one_line_error(*gen("--adapter", adapter, "Hi", "--model", tmp_path / "other"))
    assert "fingerprint" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt", "half.jsonl", "nested.jsonl",
                                                          "other", "twice.jsonl"]


def test_input_flag_needs_an_alpaca_template_that_reads_it():
    from lora_cli.errors import ConfigError
    from lora_cli.inference import DataSettings
    from lora_cli.prompts import check_input_flag

    check_input_flag(DataSettings(format="alpaca"), True, "x")  # the built-in template's Input block
    check_input_flag(DataSettings(format="alpaca", prompt_template="Q: {instruction}\nC: {input}\nA:"), True, "x")
    check_input_flag(DataSettings(format="alpaca", columns={"input": "ctx"}, prompt_template="{instruction} {ctx}"),
                     True, "x")
    check_input_flag(DataSettings(format="prompt_completion"), True, None)
    with pytest.raises(ConfigError, match=r"^--input: the adapter's prompt template has no \{input\} field"):
        check_input_flag(DataSettings(format="alpaca", prompt_template="Q: {instruction}\nA:"), True, "x")
    with pytest.raises(ConfigError, match="this adapter's data format is prompt_completion"):
        check_input_flag(DataSettings(format="prompt_completion"), True, "x")


def test_default_max_new_tokens_fits_the_context(run):
    """Without --max-new-tokens, 128 tokens at most, fewer where the longest prompt leaves less of the context (128
    here, where 128 new tokens could never fit): the output of exactly that budget."""
    root, adapter, _ = run
    prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=INSTRUCTIONS[1])
    room = 128 - len(encode(prompt))
    code, out, err = gen("--adapter", adapter, INSTRUCTIONS[1])
    assert code == 0, err
    assert (out, err) == tuple(gen("--adapter", adapter, INSTRUCTIONS[1], "--max-new-tokens", room)[1:])
    code, out, err = gen("--adapter", adapter, INSTRUCTIONS[1], "--max-new-tokens", 128)  # asked for: refused
    assert code == 2 and "--max-new-tokens 128 leaves no room" in err
    # a prompt that fills the context alone: no --max-new-tokens to blame
    long = " apple" * 130
    line = assert_one_line_error(*gen("--adapter", adapter, long, "--no-template"))
    assert line == (f"error: prompt 1 has {len(encode(long))} tokens and leaves none of the model's context of 128 "
                    "to generate in; shorten it to at most 127 tokens")
