import pytest

from lora_cli.config import RunConfig, load_config
from lora_cli.errors import ConfigError

BASE = """\
model: gpt2
out_dir: runs/x
data:
  train: data/train.json
lora:
  r: 8
train:
  lr: 3e-4
  batch_size: 4
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_coercion_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads 3e-4 as a string
    assert cfg.train.batch_size == 4 and cfg.train.epochs == 1 and cfg.lora.alpha == 16.0
    assert cfg.data.train == str(tmp_path / "data/train.json")
    assert cfg.out_dir == str(tmp_path / "runs/x")
    assert cfg.model.name == "gpt2" and cfg.model.init == "pretrained"


def test_relative_paths_are_read_from_the_resolved_config_folder(tmp_path):
    """A run's saved config.yaml holds paths relative to its resolved out_dir: read back, they name the same files
    as the first run did, in the same words (a resumed adapter's model_spec is the same bytes), also through a
    symlinked folder, where `link/A/../..` is not `tmp_path`."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "runs" / "A").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    text = BASE.replace("model: gpt2", "model: ../../ckpt").replace("train: data/train.json", "train: ../../d.json")
    first = load_config(write(tmp_path / "runs", BASE.replace("model: gpt2", "model: ../ckpt")))
    assert first.model.name == str(tmp_path.resolve() / "ckpt")
    for folder in (tmp_path / "runs" / "A", tmp_path / "link" / "A"):
        cfg = load_config(write(folder, text))
        assert cfg.model.name == first.model.name and cfg.data.train == str(tmp_path.resolve() / "d.json")


def test_quoted_integers_are_exact(tmp_path):
    """A quoted integer beyond 2**53 keeps every digit (through a float, 9007199254740993 became ...992)."""
    cfg = load_config(write(tmp_path, BASE + '  seed: "9007199254740993"\n'))
    assert cfg.train.seed == 9007199254740993
    cfg = load_config(write(tmp_path, BASE), ['train.seed="9007199254740993"', "train.max_steps='1e3'"])
    assert (cfg.train.seed, cfg.train.max_steps) == (9007199254740993, 1000)
    with pytest.raises(ConfigError, match="train.max_steps: must be an integer, got '1e999999999'"):
        load_config(write(tmp_path, BASE), ["train.max_steps='1e999999999'"])


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-4", "lora.r=16", "lora.targets=[attn.q, attn.v]",
                                              "model={name: gpt2, init: random, n_layer: 2}"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 16 and cfg.lora.targets == ["attn.q", "attn.v"]
    assert cfg.model.init == "random" and cfg.model.overrides == {"n_layer": 2}
    # a `#` is text on the command line, not a YAML comment (the template below became null, the default)
    for raw, want in (("### {instruction}\n### Response:\n", "### {instruction}\n### Response:"),
                      ("Question {instruction} #1\nAnswer", "Question {instruction} #1\nAnswer"),
                      ("'# quoted'", "# quoted")):
        cfg = load_config(write(tmp_path, BASE), [f"data.prompt_template={raw}"])
        assert cfg.data.prompt_template == want, raw
    assert load_config(write(tmp_path, BASE), ["lora.r=4 # four"]).lora.r == 4
    assert load_config(write(tmp_path, BASE), ["train.lr=3e-4 # warm"]).train.lr == 3e-4  # a number YAML left as text
    # a number is not taken as a folder name: YAML 1.1 reads 2024_01_15 as 20240115 (and 010 as 8)
    with pytest.raises(ConfigError, match=r"--set out_dir: YAML reads it as the number 20240115, which may not be "
                                          r"the name written; quote it \(out_dir: '2024'\)"):
        load_config(write(tmp_path, BASE), ["out_dir=2024_01_15"])
    assert load_config(write(tmp_path, BASE), ["out_dir='2024'"]).out_dir == str(tmp_path / "2024")
    # header and column names describe a header-less CSV val file beside JSON training data
    cfg = load_config(write(tmp_path, BASE), ["data.val=v.csv", "data.val_split=0", "data.header=false",
                                              "data.column_names=[instruction, output]"])
    assert cfg.data.column_names == ["instruction", "output"]
    # the model's integers read as the sections' do (train.seed=1e3 was taken, model.seed=1e3 refused)
    cfg = load_config(write(tmp_path, BASE), ["model={name: gpt2, init: random, seed: 1e3, n_layer: 2.0}"])
    assert (cfg.model.seed, cfg.model.overrides) == (1000, {"n_layer": 2})
    with pytest.raises(ConfigError, match=r"revision must be a branch, tag or commit of the hub repository, got \['a'"):
        load_config(write(tmp_path, BASE), ["model={name: gpt2, revision: [a, b]}"])
    with pytest.raises(ConfigError, match=r"--set train.batch_size: must be >= 1, got 0"):
        load_config(write(tmp_path, BASE), ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(ConfigError, match=r"^--set '\.lr=1': the key '\.lr' has an empty part; write SECTION.KEY"):
        load_config(write(tmp_path, BASE), [".lr=1"])
    config = write(tmp_path, "model: gpt2\ndata: {train: a.json}\n")
    with pytest.raises(ConfigError) as err:  # it replaced the model's name with {n_layer: 1}
        load_config(config, ["model.n_layer=1"])
    assert str(err.value) == (f"--set 'model.n_layer=1': model is 'gpt2' in {config}, not a mapping; set it whole "
                              "(--set model=...) or write it as a mapping in the config")


def test_every_problem_reported_at_once_with_lines(tmp_path):
    text = BASE.replace("  r: 8", "  r: 0\n  alpah: 3").replace("  batch_size: 4", "  batch_size: 0\n  lr_shedule: cosine")
    text = text.replace("lr: 3e-4", "lr: -1")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'c.yaml'}: 5 problems: ")
    assert "line 7: lora.alpah: unknown key (did you mean alpha?)" in msg
    assert "line 11: train.lr_shedule: unknown key (did you mean lr_schedule?)" in msg
    assert "line 6: lora.r: must be a positive integer, got 0" in msg
    assert "line 10: train.batch_size: must be >= 1, got 0" in msg
    assert "line 9: train.lr: must be > 0, got -1" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text,message", [
    ("model: gpt2\ndata: {train: a.json\n", "invalid YAML"),
    ("", "the config is empty"),
    # YAML aliases: a loop, and aliases of aliases ("billion laughs": 9 levels of 9) are one line, not a hang
    ("model: gpt2\ndata: {train: a.json}\nlora: {targets: &a [attn.c_attn, *a]}\n",
     "{tmp}/c.yaml:3: a YAML alias refers to a value that holds it (a loop); write the value out"),
    ("model: gpt2\ndata: {train: a.json}\na0: &a0 [x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)),
     "{tmp}/c.yaml: its YAML aliases expand it to 4,412,961,522 values (at most 10,000); write the values out"),
    ("- a\n- b\n", "must be a mapping of keys"),
    ("data: {train: a.json}\n", "model: is required"),
    ("model: gpt2\nmodle: x\ndata: {train: a.json}\n", "line 2: modle: unknown key (did you mean model?)"),
    # a key of another section is named there, not matched to a near name of this one (lora.lr: "did you mean r?")
    ("model: gpt2\ndata: {train: a.json}\nlora: {lr: 0.1}\ntrain: {r: 4, max_length: 64}\nlr: 1\n",
     "4 problems: line 5: lr: unknown key (did you mean train.lr?); line 3: lora.lr: unknown key (did you mean "
     "train.lr?); line 4: train.r: unknown key (did you mean lora.r?); line 4: train.max_length: unknown key (did you "
     "mean data.max_length?)"),
    # an empty path was read as the config's folder ("data.val: . is a directory")
    ("model: gpt2\ndata: {train: a.json, val: '', test: ' ', chat_template: ''}\n",
     "3 problems: line 2: data.val: is empty; name a file, or remove the key (null) for none; line 2: data.test: is "
     "empty; name a file, or remove the key (null) for none; line 2: data.chat_template: is empty"),
    # settings that a run would ignore
    ("model: gpt2\ndata: {train: a.json, subset: main, split: test}\n",
     "2 problems: line 2: data.split: applies to a hub dataset (hf://datasets/...) or a saved dataset folder, and "
     "data.train is the file a.json; remove data.split; line 2: data.subset: applies to a hub dataset"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {lr_schedule: constant, min_lr_ratio: 0.5}\n",
     "line 3: train.min_lr_ratio: is the floor of a decaying schedule, and train.lr_schedule is constant; set "
     "lr_schedule: cosine or linear, or remove train.min_lr_ratio"),
    ("model: gpt2\ndata: {train: a.jsonl, header: false, column_names: [text, label]}\n",
     "2 problems: line 2: data.header: describes the columns of a CSV or TSV file, and the run reads none (data.train "
     "is a.jsonl); remove it (data.columns maps roles to columns); line 2: data.column_names: describes the columns"),
    ("model: gpt2\ndata: {train: saved_dataset, header: false}\n",  # a save_to_disk folder, or hf://datasets/...
     "2 problems: line 2: data.header: describes the columns of a CSV or TSV file, and the run reads none "
     "(data.train is saved_dataset)"),
    # a comma-separated text for a list (as eval's --column-names takes it) became a one-item list
    ("model: gpt2\ntask: classification\ndata: {train: a.csv, header: false, column_names: 'label,text'}\n",
     "line 3: data.column_names: must be a list, got the text 'label,text'; write it as a list: [label, text]"),
    ("model: gpt2\ndata: {train: a.json, output_dir: x}\ntrain: {learning_rate: 0.1}\n",
     "line 2: data.output_dir: unknown key (did you mean out_dir, a top-level key?); line 3: train.learning_rate: "
     "unknown key (did you mean lr?)"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {epochs: two}\n", "line 3: train.epochs: must be an integer, got 'two'"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {lr: fast}\n", "train.lr: must be a number, got 'fast'"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {precision: fp8}\n", "train.precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("model: gpt2\n", "data.train: is required"),
    ("model: {name: gpt2, init: random, n_layers: 2}\ndata: {train: a.json}\n", "line 1: model: unknown key n_layers (did you mean n_layer?)"),
    ("model: gpt2\ndata: {train: a.json}\nlora: {dropout: 1.5}\n", "lora.dropout: must be in [0, 1), got 1.5"),
    ("model: gpt2\ndata: {train: a.json}\nlora: 3\n", "lora: must be a mapping of keys, got int"),
    ("model: gpt2\ndata: {train: a.json}\nlora: false\n", "line 3: lora: must be a mapping of keys, got bool"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: 0\n", "line 3: train: must be a mapping of keys, got int"),
    # a bad model spec does not hide the other problems
    ("model: {name: gpt2, foo: 1}\ndata: {train: a.json}\ntrain: {lr: -1}\n",
     "2 problems: line 1: model: unknown key foo"),
    ("model: {name: gpt2, foo: 1}\ndata: {train: a.json}\ntrain: {lr: -1}\n", "line 3: train.lr: must be > 0, got -1"),
    # PEFT's and transformers' names for our keys
    ("model: gpt2\ndata: {train: a.json}\nlora: {rank: 8, lora_alpha: 16, target_modules: [c_attn]}\n",
     "line 3: lora.rank: unknown key (did you mean r?); line 3: lora.lora_alpha: unknown key (did you mean alpha?); "
     "line 3: lora.target_modules: unknown key (did you mean targets?)"),
    ("model: {name: gpt2, bogus: 1}\ndata: {train: a.json}\n", "line 1: model: unknown key bogus (the keys: name, "
     "init, revision, seed, tokenizer, n_layer, n_head, n_embd, n_positions)"),
    ("model: gpt2\ndata: {train: a.csv, header: false, column_names: [text, text]}\n",
     "line 2: data.column_names: names 'text' twice; give each column its own name"),
    ("model: gpt2\ndata: {train: a.json, prompt_template: 'Q: {instruction:>5}'}\n",
     "line 2: data.prompt_template: field {instruction:>5} is not a plain {name} field; use fields such as "
     "{instruction} or {prompt}"),
    ("model: gpt2\ndata: {train: a.json, prompt_template: 'Q: {'}\n",
     "line 2: data.prompt_template: Single '{' encountered in format string; write a literal brace as {{ or }}"),
    # settings that could never apply
    ("model: gpt2\ndata: {train: a.json, labels: [a, b], balance: undersample}\n",
     "2 problems: line 2: data.labels: applies to task classification only; remove it, or set task: classification; "
     "line 2: data.balance: applies to task classification only"),
    ("model: gpt2\ntask: classification\ndata: {train: a.csv, labels: [a, b, a]}\n",
     "line 3: data.labels: names 'a' twice; list each label once, in the order of its class id"),
    ("model: gpt2\ntask: classification\ndata: {train: a.csv, labels: []}\n",
     "line 3: data.labels: is empty; list the labels in the order of their class ids, or remove it"),
    ("model: gpt2\ndata: {train: a.json, val_split: 0}\ntrain: {samples: 2, early_stopping_patience: 3}\n",
     "line 3: train.samples: needs validation data, and there is none; set data.val or data.val_split > 0; "
     "line 3: train.early_stopping_patience: needs validation data"),
    ("model: gpt2\ndata: {train: a.json, chat_template: nope.jinja}\n",
     "data.chat_template: {tmp}/nope.jinja is not a file; name a .jinja file (relative to the config), or chatml"),
    # values torch would refuse only once the run started
    ("model: gpt2\ndata: {train: a.json}\ntrain: {seed: 18446744073709551616}\n",
     "line 3: train.seed: must be an integer from -9223372036854775808 to 18446744073709551615, got "
     "18446744073709551616"),
    ("model: {name: gpt2, init: random, seed: -9223372036854775809}\ndata: {train: a.json}\n",
     "line 1: model: seed must be an integer from -9223372036854775808 to 18446744073709551615, got "
     "-9223372036854775809"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {optimizer: sgd, momentum: -1}\n",
     "line 3: train.momentum: must be >= 0, got -1"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {betas: 0.9}\n",
     "line 3: train.betas: must be two numbers in [0, 1) such as [0.9, 0.999], got 0.9"),
    ("model: gpt2\ndata: {train: a.json, val: b.json, val_split: 0.2, test: c.json, test_split: 0.1}\n",
     "2 problems: line 2: data.val_split: does not apply: data.val names the val data; remove one of them; line 2: "
     "data.test_split: does not apply: data.test names the test data"),
    ("model: gpt2\ndata: {train: a.json, columns: {promt: question}}\n",
     "line 2: data.columns.promt: unknown role (did you mean prompt?); the roles are instruction, input, output, "
     "prompt, completion, text, label, messages"),
    # an optimizer's setting under the other optimizer would be ignored
    ("model: gpt2\ndata: {train: a.json}\ntrain: {momentum: 0.9}\n",
     "line 3: train.momentum: applies to train.optimizer: sgd only (this run uses adamw); set train.optimizer: sgd "
     "or remove train.momentum"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {optimizer: sgd, betas: [0.8, 0.99], eps: 1e-6}\n",
     "2 problems: line 3: train.betas: applies to train.optimizer: adamw only (this run uses sgd); set "
     "train.optimizer: adamw or remove train.betas; line 3: train.eps: applies to train.optimizer: adamw only"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {device: 'cpu:abc'}\n",
     "line 3: train.device: must be auto, cpu, cuda, cuda:N or mps, got 'cpu:abc'"),
    # torch.device refuses an index with a leading zero, and one past 64 bits, when the run starts
    ("model: gpt2\ndata: {train: a.json}\ntrain: {device: 'cuda:01'}\n",
     "line 3: train.device: must be auto, cpu, cuda, cuda:N or mps, got 'cuda:01'"),
    ("model: gpt2\ndata: {train: a.json}\ntrain: {device: 'cuda:99999999999999999999'}\n",
     "line 3: train.device: must be auto, cpu, cuda, cuda:N or mps, got 'cuda:99999999999999999999'"),
    # that many threads crashed the process (their stacks alone exhaust memory)
    ("model: gpt2\ndata: {train: a.json}\ntrain: {num_threads: 100000}\n",
     "line 3: train.num_threads: must be from 1 to 1024 or null, got 100000"),
    # an item of a mapping or list is named
    ("model: gpt2\ndata: {train: a.json}\nlora: {rank_pattern: {c_attn: }, targets: [c_attn, null]}\n",
     "2 problems: line 3: lora.rank_pattern: c_attn: must not be null (expected int); line 3: lora.targets: item 2: "
     "must not be null (expected str)"),
    # YAML's escape of half a surrogate pair: no path can hold it (the run directory's lock crashed on it)
    ('model: gpt2\ndata: {train: a.json}\nout_dir: "runs/\\ud800"\n',
     "c.yaml:3: out_dir holds the escape \\ud800, half of a UTF-16 surrogate pair, which is no character; write the "
     "character itself"),
])
def test_bad_configs(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message.replace("{tmp}", str(tmp_path)) in str(err.value)


def test_missing_and_directory_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml")
