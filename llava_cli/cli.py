"""Command line: parse options, build `Settings`, hand over to a front-end. No model logic here.

Every command shares the model and generation options (`with_settings` adds them and passes one
validated `Settings`). `main` turns every `LlavaError` into one line on stderr and its exit code;
torch and transformers are only imported once a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from llava_cli import __version__
from llava_cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, LlavaError
from llava_cli.settings import (
    ATTENTION_BACKENDS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    DEVICES,
    DTYPES,
    Settings,
)

app = typer.Typer(
    help="Talk to LLaVA vision-language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def option(*names: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, show_default=True, **kwargs)


MODEL_HELP = "Model options"
GENERATION_HELP = "Generation options"
# name -> (type, default, typer.Option): the options every command takes, in --help order.
SHARED_OPTIONS: dict[str, tuple[Any, Any, Any]] = {
    "model": (str, DEFAULT_MODEL, option("--model", "-m", envvar="LLAVA_MODEL", help="Hub id (org/name) or local folder.", rich_help_panel=MODEL_HELP)),
    "device": (str, "auto", option("--device", help=f"{'|'.join(DEVICES)}; auto picks CUDA when present.", rich_help_panel=MODEL_HELP)),
    "dtype": (str, "auto", option("--dtype", help=f"{'|'.join(DTYPES)}; auto is float16 on GPU, float32 on CPU.", rich_help_panel=MODEL_HELP)),
    "attn": (str, "auto", option("--attn", help=f"Attention backend: {'|'.join(ATTENTION_BACKENDS)}.", rich_help_panel=MODEL_HELP)),
    "load_4bit": (bool, False, option("--load-4bit", help="Quantize to 4-bit NF4 with bitsandbytes.", rich_help_panel=MODEL_HELP)),
    "load_8bit": (bool, False, option("--load-8bit", help="Quantize to 8-bit with bitsandbytes.", rich_help_panel=MODEL_HELP)),
    "trust_remote_code": (bool, False, option("--trust-remote-code", help="Run Python code shipped in the model repo. Only for repos you trust.", rich_help_panel=MODEL_HELP)),
    "max_image_pixels": (int, DEFAULT_MAX_IMAGE_PIXELS, option("--max-image-pixels", help="Refuse larger images (decompression-bomb guard).", rich_help_panel=MODEL_HELP)),
    "temperature": (float, DEFAULT_TEMPERATURE, option("--temperature", "-t", help="0 is greedy (deterministic).", rich_help_panel=GENERATION_HELP)),
    "top_p": (float, DEFAULT_TOP_P, option("--top-p", help="Nucleus sampling threshold (with temperature > 0).", rich_help_panel=GENERATION_HELP)),
    "max_new_tokens": (int, DEFAULT_MAX_NEW_TOKENS, option("--max-new-tokens", "-n", help="Longest answer, in tokens.", rich_help_panel=GENERATION_HELP)),
    "seed": (Optional[int], None, option("--seed", help="Seed for sampling, for repeatable answers.", rich_help_panel=GENERATION_HELP)),
    "system": (Optional[str], None, option("--system", help="System text placed before the first message.", rich_help_panel=GENERATION_HELP)),
    "max_context": (Optional[int], None, option("--max-context", help="Use at most this many tokens of context.", rich_help_panel=GENERATION_HELP)),
    "verbose": (bool, False, option("--verbose", "-v", help="Show library warnings, load details and per-answer figures on stderr.")),
}


def with_settings(command: Callable[..., int]) -> Callable[..., None]:
    """Give `command` the shared options; it receives them as one validated `settings` argument."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
        for name, (kind, default, info) in SHARED_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        settings = Settings(**{name: kwargs.pop(name) for name in SHARED_OPTIONS})
        raise typer.Exit(command(settings=settings, **kwargs))

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
    return wrapper


@app.command()
@with_settings
def ask(
    args: Annotated[list[str], typer.Argument(metavar="IMAGE... [PROMPT]", help="Images, then the question. No question, or '-', reads it from stdin.", show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, model, token counts, timings.")] = False,
    settings: Settings = Settings(),
) -> int:
    """Answer one question about one or more images, on stdout.

    llava ask photo.jpg "what is in this picture?"

    echo "describe it" | llava ask photo.jpg --json | jq -r .answer
    """
    from llava_cli.ask import run_ask

    return run_ask(args, settings, json_output)


@app.command()
@with_settings
def chat(
    images: Annotated[list[str], typer.Option("--image", "-i", help="Image for the first message (repeatable).")] = [],  # noqa: B006
    json_output: Annotated[bool, typer.Option("--json", help="Without a terminal: one JSON object per answer per line.")] = False,
    settings: Settings = Settings(),
) -> int:
    """Chat with the model; /image PATH adds pictures, /help lists commands.

    Without a terminal, reads one message per line from stdin and prints each answer on a line.
    """
    from llava_cli.chat import run_chat

    return run_chat(settings, images, json_output)


def show_version(value: bool) -> None:
    if value:
        print(f"llava-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Talk to LLaVA vision-language models on your own machine."""


def main() -> None:
    """Entry point: one line on stderr and a meaningful exit code for every failure."""
    import click

    try:
        code = typer.main.get_command(app).main(prog_name="llava", standalone_mode=False)
    except LlavaError as err:
        if os.environ.get("LLAVA_DEBUG"):
            raise
        print(f"llava: error: {err}", file=sys.stderr)
        code = err.exit_code
    except click.exceptions.Exit as exit_:
        code = exit_.exit_code
    except click.ClickException as err:
        err.show()
        code = err.exit_code or EXIT_USAGE
    except (click.exceptions.Abort, KeyboardInterrupt):
        print(file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = close_broken_pipe()
    sys.exit(code or 0)


def close_broken_pipe() -> int:
    """The reader went away (`| head`): stop quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    return 0
