"""The `lora` command. Each command parses its flags, calls one library function, and prints.

Heavy imports (torch, pandas, transformers-free model code) happen inside the commands, so `lora --help`
answers at once. Every LoraError becomes one line on stderr and its exit code; `--debug` or LORA_DEBUG=1
shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lora_cli.errors import ConfigError, LoraError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune GPT-2-family models with LoRA: train, eval, merge, generate.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (repeatable)."


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (same as LORA_DEBUG=1).")) -> None:
    if debug:
        os.environ["LORA_DEBUG"] = "1"


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=None, default=str))


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

    report = describe(model, random_init=random_init, lora_config=lora_config, overrides=overrides)
    if as_json:
        echo_json(report)
        return
    typer.echo(f"model       {report['model']} ({report['source']}{', revision ' + report['revision'] if report.get('revision') else ''})")
    typer.echo("config      " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    typer.echo(f"parameters  {report['parameters']:,} (lm_head tied to wte, counted once)")
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


# ----------------------------------------------------------------------------------------- not built yet


def _not_built(command: str, issue: str) -> None:
    raise LoraError(f"`lora {command}` is not built yet ({issue}); see README.md for what works today")


@app.command()
def train(
    config: Path = typer.Argument(..., help="The run config (YAML)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, show data stats, parameters, memory estimate and one masked example; train nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in out_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in out_dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune with LoRA as the config says; writes out_dir/adapter.safetensors."""
    from lora_cli.config import load_config
    from lora_cli.train import build, dry_run_report, train as run_training

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    cfg = load_config(config, overrides)
    if dry_run:
        for line in dry_run_report(build(cfg)):
            typer.echo(line)
        return
    result = run_training(cfg, resume=resume, overwrite=overwrite, log=lambda m: typer.echo(m, err=True),
                          progress=not quiet and sys.stderr.isatty())
    typer.echo(str(result.adapter))


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_(ctx: typer.Context) -> None:
    """Loss, perplexity and accuracy of base vs adapter on held-out data (not built yet)."""
    _not_built("eval", "issue 5")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def merge(ctx: typer.Context) -> None:
    """Fold an adapter into its base and write a standalone Hugging Face model (not built yet)."""
    _not_built("merge", "issue 5")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def generate(ctx: typer.Context) -> None:
    """Generate text with a base model or adapter (not built yet)."""
    _not_built("generate", "issue 5")


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the Typer app, turning known errors into one line and an exit code."""
    import click

    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LORA_DEBUG", "") not in ("", "0")
    try:
        command.main(args=args, prog_name="lora", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: bad flag, missing argument
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except LoraError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not bad input: still one line, and the traceback on request
        if debug:
            raise
        typer.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug and report it", err=True)
        sys.exit(1)
