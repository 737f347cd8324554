"""The `lora` command. Each command parses its flags, calls one library function, and prints.

Heavy imports (torch, the model code) happen inside the commands, so `lora --help`
answers at once. Every LoraError becomes one line on stderr and its exit code; `--debug` or LORA_DEBUG=1
shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import _thread
import atexit
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer

from lora_cli.config import CHAT_MAX_NEW_TOKENS, GENERATE_MAX_NEW_TOKENS
from lora_cli.errors import ConfigError, LoraError, is_out_of_memory, out_of_memory_line
from lora_cli.jsonvalues import finite_or_null

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune GPT-style models (GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX) with LoRA: train, eval, merge, generate.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (repeatable)."


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (same as LORA_DEBUG=1).")) -> None:
    if debug:
        os.environ["LORA_DEBUG"] = "1"


def user_path(path):
    """A path flag as the shell would give it unquoted: `~` expanded (not `-`, stdin, nor an hf:// dataset)."""
    if path is None or str(path) == "-" or str(path).startswith("hf://"):
        return path
    return type(path)(os.path.expanduser(str(path)))


def echo_json(obj) -> None:
    typer.echo(json.dumps(finite_or_null(obj), indent=None, default=str))


# ---------------------------------------------------------------------------------------------------- info


@app.command()
def info(
    model: str = typer.Argument(..., help="Hub id (gpt2, org/name@rev), local directory or weights file, or a preset with --random."),
    random_init: bool = typer.Option(False, "--random", help="Describe the preset architecture with random weights (no download)."),
    lora_config: Optional[Path] = typer.Option(None, "--lora-config", help="A run config: count trainable parameters and adapter size for its lora section."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Architecture, exact parameter counts, and every linear layer LoRA can target."""
    from lora_cli.info import describe

    if overrides and lora_config is None:  # nothing would read them
        raise ConfigError("--set overrides keys of the --lora-config file: add --lora-config CONFIG, or drop --set")
    report = describe(model, random_init=random_init, lora_config=lora_config, overrides=overrides)
    if as_json:
        echo_json(report)
        return
    typer.echo(f"model       {report['model']} ({report['source']}{', revision ' + report['revision'] if report.get('revision') else ''})")
    typer.echo("config      " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    tied = " (lm_head tied to the input embedding, counted once)" if report["tied"] else ""
    typer.echo(f"parameters  {report['parameters']:,}{tied}")
    if "classifier" in report:
        c = report["classifier"]
        typer.echo(f"classifier  {c['architecture']} with {c['num_labels']} labels ({', '.join(c['labels'])}): lora-cli "
                   "reads its body; the score "
                   f"head ({c['head_parameters']:,} parameters) is not counted above")
    if "lora" in report:
        lo = report["lora"]
        typer.echo(
            f"lora        r={lo['r']} alpha={lo['alpha']:g} on {len(lo['targets'])} layers: "
            f"trainable {lo['trainable']:,} of {lo['total']:,} ({100 * lo['trainable'] / lo['total']:.4f}%)"
        )
        typer.echo(f"adapter     {lo['adapter_bytes']:,} bytes ({lo['adapter_dtype']})")
    typer.echo(f"linear layers ({len(report['linear_layers'])}; shorthands: {', '.join(report['shorthands'])}):")
    for name in report["linear_layers"]:
        typer.echo(f"  {name}")
    if "tied_head" in report:
        t = report["tied_head"]
        typer.echo(f"  ({t['head']} shares {t['embedding']}'s weight: not a LoRA target)")


# --------------------------------------------------------------------------------------------------- train


@app.command()
def train(
    config: Path = typer.Argument(..., help="The run config (YAML)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, show data stats, parameters, memory estimate and one masked example; train nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in out_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in out_dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train data-parallel with N processes on this machine (one per GPU, or CPU processes): hands over to torchrun."),
    show: Optional[int] = typer.Option(None, "--show", min=1, help="With --dry-run: show N training examples with the trained tokens in [[...]], their counts, and how many truncation left without a trained token."),
) -> None:
    """Fine-tune with LoRA as the config says; writes out_dir/adapter.safetensors."""
    from lora_cli.config import load_config
    from lora_cli.train import build, dry_run_out_dir, dry_run_report, train as run_training

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if show is not None and not dry_run:
        raise ConfigError("--show N goes with --dry-run (it shows examples instead of training)")
    cfg = load_config(config, overrides)
    if dry_run:
        setup = build(cfg, world_size=nproc)
        for line in dry_run_report(setup, show) + dry_run_out_dir(setup, resume, overwrite):
            typer.echo(line)
        return
    if nproc is not None:
        from lora_cli.distributed import launch, launched, resolve_batch

        if launched():
            raise ConfigError("--nproc starts its own processes; under torchrun leave it out")
        t = cfg.train
        resolve_batch(t.batch_size, t.grad_accum, t.global_batch_size, nproc)  # a bad split fails before launching
        flags = [a for o in overrides for a in ("--set", o)] + ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(launch(nproc, [str(config), *flags, *["--quiet"] * quiet]))
    result = run_training(cfg, resume=resume, overwrite=overwrite, log=lambda m: typer.echo(m, err=True),
                          progress=not quiet and sys.stderr.isatty())
    if result.rank == 0:
        typer.echo(str(result.adapter))


ADAPTER_HELP = "An adapter: .safetensors from `lora train`, a run directory, or a PEFT adapter directory."
MODEL_HELP = "Base model (hub id, local directory or weights file); default: the adapter's own base."
CHAT_TEMPLATE_HELP = "Chat template instead of the adapter's or the model's: chatml (built in) or a Jinja file."
PRECISION_HELP = "Weights stored and computed in fp32, bf16 or fp16 (fp16: CUDA only); bf16 halves the bytes read per token."
MISMATCH_HELP = "Use the adapter even if the base model's fingerprint differs from the one it was trained on."


@app.command(name="eval")
def eval_(
    config: Optional[Path] = typer.Argument(None, help="A run config: evaluate its test split (data.test or test_split), else its validation split, with out_dir/adapter.safetensors."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Alone: evaluate that model."),
    data: Optional[str] = typer.Option(None, "--data", help="Held-out data file (.csv/.tsv/.json/.jsonl/.parquet/.txt), a save_to_disk directory or hf://datasets/OWNER/NAME, encoded as the adapter was trained."),
    split: Optional[str] = typer.Option(None, "--split", help="--data from a hub dataset or a saved DatasetDict: the split to read (default: data.split, train)."),
    subset: Optional[str] = typer.Option(None, "--subset", help="--data from a hub dataset: its configuration (load_dataset's name)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples (and prompts, with --generate) per batch."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per example (default: the adapter's data.max_length)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Data format instead of the adapter's: auto, alpaca, prompt_completion, text, chat."),
    columns: List[str] = typer.Option([], "--column", help="ROLE=COLUMN, e.g. --column prompt=mr (repeatable)."),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="Prompt template instead of the adapter's."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat data: c" + CHAT_TEMPLATE_HELP[1:]),
    no_header: bool = typer.Option(False, "--no-header", help="The CSV/TSV --data file has no header row (with --column-names)."),
    column_names: Optional[str] = typer.Option(None, "--column-names", help="NAME,NAME,...: the --data file's column names (its header's, or with --no-header its columns')."),
    no_base: bool = typer.Option(False, "--no-base", help="Skip the base model's numbers (faster)."),
    gen: bool = typer.Option(False, "--generate", help="Also generate for each distinct prompt and score BLEU, NIST, ROUGE-L, CIDEr and exact match against all its references."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="--generate: tokens to generate at most."),
    num_beams: int = typer.Option(1, "--num-beams", help="--generate: beam search with this many beams (1: greedy)."),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="--generate: beam score = log p / length**penalty."),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="--generate: never repeat an n-gram of this size (0: off)."),
    lowercase: bool = typer.Option(False, "--lowercase", help="--generate: BLEU and NIST ignore case, as the E2E challenge's scoring script does."),
    meteor: bool = typer.Option(False, "--meteor", help="--generate: also METEOR 1.5 (needs `pip install pycocoevalcap` and Java)."),
    predictions: Optional[str] = typer.Option(None, "--predictions", help="--generate: write each prompt, its output and references as JSONL."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP + " (with CONFIG)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Classifiers: write the confusion matrix as a PNG image to this file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="--predictions and --plot may replace existing files."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip (and count) rows with a missing or empty field instead of stopping at the first."),
) -> None:
    """Loss, perplexity and next-token accuracy on held-out data: base and adapter side by side. Classifiers:
    loss, accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix."""
    from lora_cli.evaluate import EvalOptions, eval_table, run_eval

    if config is not None and config.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{config}: `lora eval` takes a run config (.yaml); pass data with --data FILE")
    if config is None and adapter is None and model is None:
        raise ConfigError("name what to evaluate: --adapter FILE, --model MODEL, or a run config")
    data = user_path(data)
    predictions, plot = user_path(predictions), user_path(plot)  # as typed: a trailing slash is checked
    options = EvalOptions(
        data=data, split=split, subset=subset, adapter=adapter, model=model, config=config, overrides=tuple(overrides), batch_size=batch_size,
        max_length=max_length, fmt=fmt, columns=tuple(columns), prompt_template=prompt_template,
        chat_template=chat_template, header=False if no_header else None,
        column_names=tuple(column_names.split(",")) if column_names is not None else (),
        compare_base=not no_base, allow_mismatch=allow_mismatch, generate=gen, max_new_tokens=max_new_tokens,
        num_beams=num_beams, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        lowercase=lowercase, meteor=meteor, predictions=predictions, device=device,
        precision=precision, progress=not quiet and sys.stderr.isatty(), plot=plot, overwrite=overwrite,
        skip_bad_rows=skip_bad_rows)
    result = run_eval(options, log=lambda m: typer.echo(m, err=True))
    if as_json:
        echo_json(result)
        return
    for line in eval_table(result):
        typer.echo(line)


@app.command()
def merge(
    adapter: Path = typer.Option(..., "--adapter", help=ADAPTER_HELP),
    out: Path = typer.Option(..., "--out", help="The directory to write (must not exist, unless --overwrite)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help="Stored weights: fp32, bf16 or fp16 (the merge itself is fp32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing merged model directory."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
) -> None:
    """Fold an adapter into its base: a standalone Hugging Face model directory with tokenizer and model card."""
    from lora_cli.merge import merge_adapter

    result = merge_adapter(adapter, out, model=model, dtype=dtype, overwrite=overwrite,
                           allow_mismatch=allow_mismatch, log=lambda m: typer.echo(m, err=True))
    typer.echo(str(result.out_dir))


CHAT_HELP = ("Answer a conversation: one JSON argument ([{\"role\": \"user\", \"content\": \"...\"}] or "
             "{\"messages\": [...]}), or --file JSONL with one per line; rendered with the chat template.")


@app.command()
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts (for alpaca adapters: the instruction)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    file: Optional[Path] = typer.Option(None, "--file", help="Prompts, one per line ('-': stdin; blank lines are skipped: --json keeps each answer with its prompt); with --json one JSON object per line."),
    as_json: bool = typer.Option(False, "--json", help="JSONL in (--file) and out: each object plus \"generated\"."),
    no_template: bool = typer.Option(False, "--no-template", help="Feed prompts as they are, without the adapter's prompt template."),
    input_text: Optional[str] = typer.Option(None, "--input", help="Alpaca adapters: the Input block for every prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=f"Tokens to generate at most (default: {GENERATE_MAX_NEW_TOKENS}, or what the model's context leaves after the longest prompt; stops earlier at <|endoftext|>)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample at this temperature (default: greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample from the smallest set of tokens with this total probability."),
    greedy: bool = typer.Option(False, "--greedy", help="Always the most likely token (the default without sampling flags)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search with this many beams."),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="Beam search: score = log p / length**penalty."),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0: off)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence at every step (slow; checks the KV cache)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    chat: bool = typer.Option(False, "--chat", help=CHAT_HELP),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
) -> None:
    """Generate text with an adapter (its prompt template applied) or a base model; streams a single prompt."""
    from lora_cli.answer import Decoding, GenerateOptions, Source, run_generate

    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, seed=seed, no_repeat_ngram_size=no_repeat_ngram_size, use_cache=not no_cache)
    run_generate(GenerateOptions(
        Source(adapter, model, allow_mismatch, device, precision), decoding, prompts=prompts or [], file=user_path(file),
        as_json=as_json, template=not no_template, input_text=input_text, num_beams=num_beams,
        length_penalty=length_penalty, batch_size=batch_size, progress=not quiet and sys.stderr.isatty(), chat=chat,
        chat_template=chat_template), write=_write_flush)


def _write_flush(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def chat(
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="A system message that starts the conversation (kept by /reset)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=f"Tokens per reply at most (default: {CHAT_MAX_NEW_TOKENS}, or what the context leaves after the conversation; stops earlier at the end of the turn)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample at this temperature (default: greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample from the smallest set of tokens with this total probability."),
    greedy: bool = typer.Option(False, "--greedy", help="Always the most likely token (the default without sampling flags)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0: off)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence at every step (slow; checks the KV cache)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Talk with a chat adapter (or model) in the terminal: replies stream, the history is kept; /reset clears
    it, /exit or Ctrl-D ends."""
    from lora_cli.answer import Decoding, Source, run_chat

    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, seed=seed, no_repeat_ngram_size=no_repeat_ngram_size, use_cache=not no_cache)
    failed = run_chat(Source(adapter, model, allow_mismatch, device, precision), decoding, system, chat_template,
                      log=lambda m: typer.echo(m, err=True))
    if failed:  # each failed turn printed its error line
        raise typer.Exit(1)


@app.command()
def predict(
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to classify (none: --file, or stdin)."),
    adapter: Path = typer.Option(..., "--adapter", help="A classification adapter (lora train with task: classification)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    file: Optional[Path] = typer.Option(None, "--file", help="Texts, one per line ('-': stdin); blank lines are skipped."),
    as_json: bool = typer.Option(False, "--json", help='One JSON object per line: {"text", "label", "probability", "probabilities"}.'),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Texts per batch."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Classify texts with a classification adapter: prints `label probability` per text (e.g. `spam 0.9812`)."""
    from lora_cli.inference import open_adapter
    from lora_cli.predict import check_classifier, load_classifier, predict_texts, prediction_line, read_texts

    adapter_obj = open_adapter(adapter)
    check_classifier(adapter_obj)  # before reading stdin or loading the base
    items = read_texts(texts or [], user_path(file))
    loaded = load_classifier(adapter_obj, model, allow_mismatch, device, precision)
    from tqdm import tqdm

    show = not quiet and sys.stderr.isatty() and len(items) > batch_size
    with tqdm(total=len(items), desc="predict", unit="text", file=sys.stderr, disable=not show, dynamic_ncols=True,
              leave=False) as bar:
        predictions = predict_texts(loaded, [text for text, _ in items], batch_size=batch_size, progress=bar.update)
    for p in predictions:
        typer.echo(json.dumps(finite_or_null(p.to_dict()), ensure_ascii=False) if as_json else prediction_line(p))


@app.command()
def export(
    adapter: Path = typer.Argument(..., help=ADAPTER_HELP),
    out: str = typer.Argument(..., help="peft: the adapter directory to write; gguf, gguf-lora: the .gguf file to write."),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter_config.json + adapter_model.safetensors), gguf (the merged model for llama.cpp / Ollama) or gguf-lora (the adapter alone, for llama-cli --lora)."),
    dtype: str = typer.Option("f32", "--dtype", help="gguf, gguf-lora: stored weights, f32, f16, bf16 or q8_0 (1-D tensors stay f32)."),
    ollama: bool = typer.Option(False, "--ollama", help="gguf: also write an Ollama Modelfile (FROM, TEMPLATE, stop tokens) beside the file."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " (gguf formats)"),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export (a PEFT adapter directory, a GGUF file, the Modelfile); other files are never replaced."),
) -> None:
    """Convert an adapter: a Hugging Face PEFT adapter directory, or GGUF for llama.cpp and Ollama."""
    from lora_cli.fsutil import output_path

    out = output_path(out, "OUT", file=fmt in ("gguf", "gguf-lora"))
    if fmt in ("gguf", "gguf-lora"):
        from lora_cli.gguf_export import export_gguf

        result = export_gguf(adapter, out, fmt=fmt, dtype=dtype, model=model, ollama=ollama,
                             allow_mismatch=allow_mismatch, overwrite=overwrite,
                             log=lambda m: typer.echo(m, err=True))
        typer.echo(str(result.path))
        if result.modelfile is not None:
            typer.echo(str(result.modelfile))
        return
    from lora_cli.adapter import export_peft

    if fmt != "peft":
        raise ConfigError(f"--format {fmt!r} is not supported; the export formats are peft, gguf and gguf-lora")
    if ollama or dtype != "f32" or model is not None:
        raise ConfigError("--dtype, --ollama and --model are for --format gguf / gguf-lora; a PEFT export copies the "
                          "adapter as it is")
    typer.echo(str(export_peft(adapter, out, overwrite=overwrite)))


@app.command()
def serve(
    adapters: List[str] = typer.Option([], "--adapter", help="An adapter to serve, as PATH or NAME=PATH (repeatable): requests pick it by NAME in their `model` field (default name: the run directory's or file's name)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Served under its own name."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port; the startup line names it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 requests (default: $LORA_API_KEY)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help=MISMATCH_HELP),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /v1/chat/completions, /health) until SIGTERM or Ctrl-C."""
    from lora_cli.serve import serve as run_server

    run_server(adapters, model, host, port, api_key, device, allow_mismatch, log=lambda m: typer.echo(m, err=True),
               precision=precision)


# ---------------------------------------------------------------------------------------------------- main


# Process settings that only take effect if made before torch is imported (the commands import it lazily).
# MKL_DISABLE_FAST_MM: MKL's memory manager keeps the packing buffers of its matmuls for reuse, scattered through
# the heap, where they split the free space that activations of differently sized batches could reuse: peak RSS
# of the instruction benchmark (scripts/benchmark.py, gpt2 124M fp32, 2 cores) fell from 1126 to 1099 MB with the
# same tokens/s.
PROCESS_ENV = {"MKL_DISABLE_FAST_MM": "1"}


def prepare_process() -> None:
    """Apply PROCESS_ENV (values the user set win); call before torch is imported."""
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)


class _Signals:
    """SIGINT and SIGTERM as KeyboardInterrupt, so that a stopped command cleans up as on Ctrl-C (atomic outputs,
    locks) and says `interrupted` (SIGTERM killed it without either). Typer turns the KeyboardInterrupt into a
    plain exit code 130: `received` tells that apart from a 130 a command returns itself (torchrun's launcher).
    Commands with their own handlers (training's loop, serve) replace these while they run."""

    STOP = (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []
    waiting = False  # a thread waits for an import to finish, to deliver a signal that came during it

    @classmethod
    def install(cls) -> None:
        cls.received = []
        cls._set(cls.handle)

    @classmethod
    def _set(cls, handler) -> bool:
        """`handler` for both stop signals; False where signals cannot be set (not the main thread: main() called
        from a test's worker thread)."""
        try:
            for sig in cls.STOP:
                signal.signal(sig, handler)
        except ValueError:
            return False
        return True

    @classmethod
    def handle(cls, signum, frame) -> None:
        cls.received.append(signum)
        cls._raise_outside_imports(signum, frame)

    @classmethod
    def _raise_outside_imports(cls, signum, frame) -> None:
        """KeyboardInterrupt, unless an import is under way: torch goes on past a numpy import that failed, and
        the command ran on with half a numpy (to its end, or to a crash at its first use). Then a thread watches
        the main thread, and once no import is under way it delivers the signal again (_thread.interrupt_main)."""
        if not _importing(frame):
            raise KeyboardInterrupt
        if not cls.waiting:
            cls.waiting = True
            threading.Thread(target=cls._after_imports, args=(signum,), daemon=True).start()

    @classmethod
    def settle(cls, code) -> None:
        """The command has ended with exit `code` (SystemExit's) and its outputs are complete. Python's exit then
        tears down torch for 1-3 s, and at its end no Python handler runs: a SIGTERM there killed the process with
        143 and no word, after a run that had finished. So from now on a signal ends the process at once with
        `code`, and once Python's own exit begins (the atexit callbacks, this one first), signals are ignored."""
        code = 0 if code is None else code if isinstance(code, int) else 1

        def end_now(signum, frame) -> None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

        if cls._set(end_now):
            atexit.register(cls._set, signal.SIG_IGN)

    @classmethod
    def _after_imports(cls, signum: int) -> None:
        main = threading.main_thread().ident
        while _importing(sys._current_frames().get(main)):
            time.sleep(0.05)
        cls.waiting = False
        _thread.interrupt_main(signum)


def _importing(frame) -> bool:
    """Whether the frame's thread is inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the Typer app, turning known errors into one line and an exit code."""
    try:
        _main(argv)
    except SystemExit as exc:
        _Signals.settle(exc.code)
        raise
    _Signals.settle(0)


def _main(argv: list[str] | None) -> None:
    import click

    prepare_process()
    _Signals.install()

    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LORA_DEBUG", "") not in ("", "0")
    # Typer >= 0.2x runs on its own vendored copy of click (typer._click): catch its exceptions as well.
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = click.exceptions
    usage_errors = (click.ClickException, vendored.ClickException)
    try:
        # Outside standalone mode click returns a command's typer.Exit code instead of raising it
        code = command.main(args=args, prog_name="lora", standalone_mode=False)
        if _Signals.waiting:  # a signal came during an import, and the command ended before it was delivered
            code = 130
        if code == 130 and _Signals.received:  # typer's own exit for a KeyboardInterrupt: say it
            typer.echo("interrupted", err=True)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.NoArgsIsHelpError, vendored.NoArgsIsHelpError) as exc:  # bare `lora`: the help
        if exc.format_message().strip():  # (Typer's rich help has been printed already)
            exc.show()
        sys.exit(exc.exit_code)
    except usage_errors as exc:  # bad flag, missing argument: one line, exit 2
        ctx = getattr(exc, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as exc:
        # typer's exit for output to a closed pipe (`lora info | head -1`): code 1 and no word, after wrapping
        # stdout; a process killed by SIGPIPE, as other tools are there, reports 141
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            sys.exit(141)
        raise
    except LoraError as exc:
        if debug:
            raise
        # under torchrun, rank 0 prints what every rank raised: errors it shared, and config errors (the same
        # config and process count everywhere)
        if not (getattr(exc, "from_rank0", False) or (isinstance(exc, ConfigError) and _rank_prefix())):
            typer.echo(f"{_rank_prefix()}error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line, and the traceback on request
        if debug:
            raise
        if is_out_of_memory(exc):  # sizes this machine cannot hold: the input's fault, not a bug
            typer.echo(f"{_rank_prefix()}error: {out_of_memory_line(exc)}", err=True)
            sys.exit(1)
        typer.echo(f"{_rank_prefix()}error: internal error ({type(exc).__name__}: {exc}); rerun with --debug and report it", err=True)
        sys.exit(1)


def _rank_prefix() -> str:
    """"[rank N] " on the processes of a torchrun job other than rank 0, so their messages can be told apart."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return "" if rank == "0" else f"[rank {rank}] "
