"""Command line: parse options, build `Settings`, hand over to a front-end. No model logic here.

Every command shares the model and generation options (`with_settings` adds them and passes one
validated `Settings`). `main` turns every `LlavaError` into one line on stderr and its exit code;
torch and transformers are only imported once a command runs, so `--help` answers at once (help
pages and usage errors come from usage.py). `program`, the installed entry point, exits without
the interpreter's slow teardown once torch is loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, Optional

import typer

from llava_cli import __version__
from llava_cli.base.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, LlavaError, one_line
from llava_cli.base.options import LOGPROBS, OPTIONS, Option
from llava_cli.base.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_PARALLEL,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_SERVER_HOST,
    DEFAULT_SERVER_PORT,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    Settings,
)
from llava_cli.base.terminal import emit_error
from llava_cli.usage import preflight

app = typer.Typer(
    help="Talk to LLaVA vision-language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help pages come from usage.py; typer's Rich ones are never drawn
    context_settings={"help_option_names": ["-h", "--help"]},
)


BATCH_HELP = "Many images (one answer each)"
SESSION_HELP = "Saved conversations"
NO_SAVE = typer.Option(
    "--no-save", help="Do not save this conversation (nor update a resumed one).", rich_help_panel=SESSION_HELP
)
# One-shot questions pile up as conversations; this environment variable turns their saving off for good.
ASK_NO_SAVE = typer.Option(
    "--no-save",
    envvar="LLAVA_ASK_NO_SAVE",
    help="Do not save this conversation (nor update a resumed one); LLAVA_ASK_NO_SAVE=1 makes it the default.",
    rich_help_panel=SESSION_HELP,
)
DROP_MISSING = typer.Option(
    "--drop-missing-images",
    help="Continue a conversation without its images that have vanished or changed.",
    rich_help_panel=SESSION_HELP,
)


def typer_option(option: Option) -> tuple[Any, Any, Any]:
    """(type, default, typer.Option) for a row of the option table."""
    kind = Optional[option.kind] if option.optional else option.kind
    info = typer.Option(
        *option.flags,
        help=option.help,
        show_default=True,
        metavar=option.metavar,
        envvar=option.envvar,
        rich_help_panel=option.panel,
    )
    return kind, option.default, info


# name -> (type, default, typer.Option): the options every command takes, in --help order (base/options.py declares them).
SHARED_OPTIONS: dict[str, tuple[Any, Any, Any]] = {
    name: typer_option(option) for name, option in OPTIONS.items() if not option.client
}
# The commands that can answer through a server (ask, chat) also take these (--server, --no-server); `llava serve` does not.
CLIENT_OPTIONS: dict[str, tuple[Any, Any, Any]] = {
    name: typer_option(option) for name, option in OPTIONS.items() if option.client
}


def with_settings(
    command: Callable[..., int], options: dict[str, tuple[Any, Any, Any]] = SHARED_OPTIONS
) -> Callable[..., None]:
    """Give `command` the shared options; it receives them as one validated `settings` argument."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
        for name, (kind, default, info) in options.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        chosen = given_options(kwargs["ctx"]) if "ctx" in kwargs else frozenset()
        settings = Settings(**{name: kwargs.pop(name) for name in options}, chosen=chosen)
        try:
            code = command(settings=settings, **kwargs)
        except BrokenPipeError:  # handled here: click would turn it into exit 1
            code = close_broken_pipe()
        raise typer.Exit(code)

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
    return wrapper


def given_options(ctx: typer.Context) -> frozenset[str]:
    """The shared options typed on the command line: a resumed conversation keeps its own values for the rest."""
    return frozenset(
        name for name in SHARED_OPTIONS if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    )


def with_client_settings(command: Callable[..., int]) -> Callable[..., None]:
    """`with_settings` plus --server/--no-server."""
    return with_settings(command, SHARED_OPTIONS | CLIENT_OPTIONS)


@app.command()
@with_client_settings
def ask(
    ctx: typer.Context,
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="IMAGE... [PROMPT]",
            help="Images (files, http(s) URLs, '-' for stdin), then the question. No question, or '-', reads it from stdin.",
            show_default=False,
        ),
    ] = [],  # noqa: B006
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: answer, model, token counts, timings.")
    ] = False,
    prompt: Annotated[
        Optional[str],
        typer.Option("--prompt", "-p", metavar="TEXT", help="The question; then every argument is an image."),
    ] = None,
    pages: Annotated[
        Optional[str],
        typer.Option(
            "--pages",
            metavar="PAGES",
            help="Pages of a PDF argument, e.g. 1-3,7 (default: the first). Needs pip install 'llava-cli[pdf]'.",
            show_default=False,
        ),
    ] = None,
    clipboard: Annotated[
        bool,
        typer.Option(
            "--clipboard",
            help="Also ask about the image on the system clipboard (wl-paste, xclip, pngpaste, osascript or PowerShell).",
        ),
    ] = False,
    output_format: Annotated[
        Optional[str],
        typer.Option(
            "--output-format",
            metavar="FORMAT",
            help="text|json|jsonl|csv; default text, or jsonl with --each. csv: one row per image, a column per top-level schema field.",
            show_default=False,
        ),
    ] = None,
    each: Annotated[
        bool,
        typer.Option(
            "--each",
            help="Ask the question of each image separately: one answer (JSON line) per image.",
            rich_help_panel=BATCH_HELP,
        ),
    ] = False,
    from_file: Annotated[
        Optional[str],
        typer.Option(
            "--from-file",
            metavar="FILE",
            help="Image paths or URLs, one per line ('-': stdin); implies --each.",
            rich_help_panel=BATCH_HELP,
        ),
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Append JSON lines to FILE; a rerun skips images already answered there.",
            rich_help_panel=BATCH_HELP,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images answered together in one pass (same greedy answers, more throughput).",
            rich_help_panel=BATCH_HELP,
        ),
    ] = DEFAULT_BATCH_SIZE,
    parallel: Annotated[
        Optional[int],
        typer.Option(
            "--parallel",
            metavar="N",
            help=f"Through a server (--server, a running llava serve): up to N requests at once (default {DEFAULT_PARALLEL}).",
            rich_help_panel=BATCH_HELP,
            show_default=False,
        ),
    ] = None,
    ray: Annotated[
        Optional[str],
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Answer on a Ray cluster: local (start one here), auto (the running one), ray://HOST:PORT. Workers must read the images (shared storage or URLs). Needs pip install 'llava-cli[ray]'.",
            show_default=False,
            rich_help_panel=BATCH_HELP,
        ),
    ] = None,
    actors: Annotated[
        Optional[int],
        typer.Option(
            "--actors",
            metavar="N",
            help="With --ray: model copies answering at once (default: one per GPU, or per node).",
            show_default=False,
            rich_help_panel=BATCH_HELP,
        ),
    ] = None,
    gpus_per_actor: Annotated[
        Optional[float],
        typer.Option(
            "--gpus-per-actor",
            metavar="G",
            help="With --ray: GPUs each model copy gets (default 1 on a GPU cluster, 0 on CPUs).",
            show_default=False,
            rich_help_panel=BATCH_HELP,
        ),
    ] = None,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive", help="With --each FOLDER: the images in its subfolders too.", rich_help_panel=BATCH_HELP
        ),
    ] = False,
    continue_last: Annotated[
        bool,
        typer.Option(
            "--continue",
            "-c",
            help="Continue the last saved conversation (chat or ask): images become optional.",
            rich_help_panel=SESSION_HELP,
        ),
    ] = False,
    no_save: Annotated[bool, ASK_NO_SAVE] = False,
    drop_missing_images: Annotated[bool, DROP_MISSING] = False,
    schema: Annotated[
        Optional[str],
        typer.Option(
            "--schema",
            metavar="SCHEMA",
            help="The answer is JSON following this JSON schema: a file, inline JSON, or 'name, age int, colours list' (str, int, float, bool, list). --json holds it parsed. Needs pip install 'llava-cli[schema]'.",
            show_default=False,
        ),
    ] = None,
    answer_format: Annotated[
        Optional[str],
        typer.Option("--format", metavar="json", help="json: the answer is a JSON object.", show_default=False),
    ] = None,
    stop: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stop",
            metavar="TEXT",
            help="End the answer before this text (repeatable); nothing past it is printed.",
            show_default=False,
        ),
    ] = None,
    logprobs: Annotated[Optional[int], typer_option(LOGPROBS)[2]] = None,
    settings: Settings = Settings(),
) -> int:
    """Answer one question about one or more images, on stdout; --each: about every image separately.

    llava ask photo.jpg "what is in this picture?"

    echo "describe it" | llava ask photo.jpg --json | jq -r .answer

    llava ask --each photos/*.jpg -p "describe it" -o captions.jsonl

    llava ask -c "and what colour is it?"
    """
    from llava_cli.ask.one import run_ask
    from llava_cli.engine.constraints import ask_constraint
    from llava_cli.engine.stops import stop_list
    from llava_cli.frontend.arguments import AskOptions
    from llava_cli.store.resume import SessionOptions

    settings = ask_constraint(settings, schema, answer_format)
    if stop:
        settings = dataclasses.replace(settings, stop=stop_list(stop, "--stop", limit=None))
    options = AskOptions.from_command_line(
        dict(
            json_output=json_output,
            output_format=output_format,
            prompt=prompt,
            each=each,
            from_file=from_file,
            output=output,
            batch_size=batch_size,
            parallel=parallel,
            ray=ray,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            clipboard=clipboard,
            pages=pages,
            recursive=recursive,
            logprobs=logprobs,
        )
    )
    if logprobs is not None:
        settings = dataclasses.replace(settings, logprobs=logprobs)
    sessions = SessionOptions(
        save=not no_save, resume=continue_last, drop_missing_images=drop_missing_images, given=settings.chosen
    )
    return run_ask(args, settings, json_output, options, sessions)


@app.command()
@with_client_settings
def chat(
    ctx: typer.Context,
    session: Annotated[
        Optional[str],
        typer.Argument(
            metavar="ID",
            help="With --resume: the conversation's id or name (default: the last one).",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        list[str], typer.Option("--image", "-i", metavar="IMAGE", help="Image for the first message (repeatable).")
    ] = [],  # noqa: B006
    json_output: Annotated[
        bool, typer.Option("--json", help="Without a terminal: one JSON object per answer per line.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", "-r", help="Continue a saved conversation: the last one, or ID.", rich_help_panel=SESSION_HELP
        ),
    ] = False,
    no_save: Annotated[bool, NO_SAVE] = False,
    drop_missing_images: Annotated[bool, DROP_MISSING] = False,
    no_markdown: Annotated[
        bool, typer.Option("--no-markdown", help="Show answers as plain text, not rendered Markdown.")
    ] = False,
    settings: Settings = Settings(),
) -> int:
    """Chat with the model; /image PATH adds pictures, /help lists commands.

    Without a terminal, reads one message per line from stdin and prints each answer on a line.
    Every conversation is saved; `llava chat --resume` continues the last one.
    """
    from llava_cli.chat.loop import run_chat
    from llava_cli.frontend.arguments import check_chat_arguments
    from llava_cli.store.resume import SessionOptions

    check_chat_arguments({"session": session, "resume": resume})
    sessions = SessionOptions(
        save=not no_save, resume=resume, session=session, drop_missing_images=drop_missing_images, given=settings.chosen
    )
    return run_chat(settings, images, json_output, sessions, markdown=not no_markdown)


@app.command()
@with_settings
def serve(
    host: Annotated[
        str,
        typer.Option("--host", metavar="HOST", help="Address to listen on; 0.0.0.0 opens the server to your network."),
    ] = DEFAULT_SERVER_HOST,
    port: Annotated[
        int, typer.Option("--port", metavar="PORT", help="Port to listen on (0: any free port).")
    ] = DEFAULT_SERVER_PORT,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="LLAVA_API_KEY",
            metavar="KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every request. On the command line the key shows in `ps` to every local user: prefer LLAVA_API_KEY or --api-key-file.",
        ),
    ] = None,
    api_key_file: Annotated[
        Optional[str],
        typer.Option(
            "--api-key-file",
            metavar="FILE",
            show_default=False,
            help="Read the API keys from FILE, one a line (keep it 0600); logs name them key-1, key-2...",
        ),
    ] = None,
    max_request_mb: Annotated[
        int, typer.Option("--max-request-mb", help="Refuse larger request bodies (images included).")
    ] = DEFAULT_MAX_REQUEST_MB,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout", metavar="SECONDS", help="A request body must arrive within this time (408 otherwise)."
        ),
    ] = DEFAULT_REQUEST_TIMEOUT_S,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            show_default=False,
            help="Also answer requests whose Host header is NAME (repeatable; '*': any). localhost, IP addresses and --host always work.",
        ),
    ] = None,
    allowed_origin: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allowed-origin",
            metavar="ORIGIN",
            show_default=False,
            help="Answer requests from web pages of ORIGIN, e.g. http://localhost:3000 (repeatable; '*': any). Others are refused.",
        ),
    ] = None,
    allowed_local_media_path: Annotated[
        Optional[str],
        typer.Option(
            "--allowed-local-media-path",
            metavar="DIR",
            show_default=False,
            help="Let requests name image files under DIR (symlinks resolved). Without it only data: URLs are accepted.",
        ),
    ] = None,
    max_batch: Annotated[
        Optional[int],
        typer.Option(
            "--max-batch",
            metavar="N",
            show_default=False,
            help="Answer up to N requests at once, decoded together (default: as many as the GPU's free memory holds at full context, 8 on a CPU).",
        ),
    ] = None,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive",
            metavar="DURATION",
            help="Unload the model after this idle time (30s, 5m, 1h; 0: after each answer; -1: never); the next request loads it again.",
        ),
    ] = "-1",
    metrics_public: Annotated[
        bool, typer.Option("--metrics-public", help="Serve GET /metrics without the API key.")
    ] = False,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout", metavar="SECONDS", help="Close connections whose request headers take longer."
        ),
    ] = DEFAULT_HEADER_TIMEOUT_S,
    timeout_keep_alive: Annotated[
        float,
        typer.Option("--timeout-keep-alive", metavar="SECONDS", help="Close idle kept-alive connections after this."),
    ] = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            metavar="N",
            help="Open connections in all (kept under the open-file limit); more are refused with 503.",
        ),
    ] = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_client: Annotated[
        int, typer.Option("--max-connections-per-client", metavar="N", help="Open connections from one address.")
    ] = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            metavar="SECONDS",
            help="On SIGTERM, refuse new requests (503) and let answers in flight finish for up to this long.",
        ),
    ] = DEFAULT_DRAIN_TIMEOUT_S,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            metavar="FORMAT",
            help="Access log: text (with --verbose) or json (one line per request on stderr).",
        ),
    ] = "text",
    served_model_name: Annotated[
        Optional[str],
        typer.Option(
            "--served-model-name",
            metavar="NAME",
            show_default=False,
            help="The model id clients send and /v1/models lists (default: the hub id, or the folder's name).",
        ),
    ] = None,
    settings: Settings = Settings(),
) -> int:
    """Keep the model loaded and serve the OpenAI chat-completions API on http://HOST:PORT/v1.

    llava serve --model llava-hf/llava-1.5-7b-hf

    `llava ask` and `llava chat` on this machine then use it by themselves; with --server URL from anywhere, as does any OpenAI client with base_url URL/v1.

    Generation options are the defaults for requests. Ctrl-C stops it (exit 130), SIGTERM too (exit 0).
    """
    from llava_cli.serve.guard import ServeOptions, api_keys_from_file
    from llava_cli.serve.keepalive import parse_keep_alive
    from llava_cli.serve.server import run_serve

    api_keys = (
        api_keys_from_file(api_key_file) if api_key_file is not None else (api_key,) if api_key is not None else ()
    )
    options = ServeOptions(
        host=host,
        port=port,
        api_keys=api_keys,
        max_request_mb=max_request_mb,
        request_timeout_s=request_timeout,
        allowed_hosts=tuple(allowed_host or ()),
        allowed_origins=tuple(allowed_origin or ()),
        allowed_local_media_path=allowed_local_media_path,
        max_batch=max_batch,
        keep_alive_s=parse_keep_alive(keep_alive),
        metrics_public=metrics_public,
        header_timeout_s=header_timeout,
        timeout_keep_alive_s=timeout_keep_alive,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        drain_timeout_s=drain_timeout,
        log_format=log_format,
        served_model_name=served_model_name,
    )
    return run_serve(settings, options)


@app.command()
def models(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON list: model, family, size_bytes, offline, missing.")
    ] = False,
) -> None:
    """List the LLaVA-family checkpoints in the local Hugging Face cache, and whether each loads offline.

    The cache is HF_HUB_CACHE, else HF_HOME/hub (~/.cache/huggingface/hub). Nothing is downloaded.
    """
    from llava_cli.manage.models import run_models

    raise typer.Exit(run_models(json_output))


@app.command()
def pull(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="Hub id (org/name), e.g. llava-hf/llava-1.5-7b-hf.", show_default=False),
    ],
) -> None:
    """Download a model ahead of time: only the files llava-cli loads, with progress; an interrupted pull resumes.

    llava pull llava-hf/llava-1.5-7b-hf
    """
    from llava_cli.models.download import run_pull

    raise typer.Exit(run_pull(model))


@app.command()
def show(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Hub id in the local cache, or a local folder.", show_default=False)
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What a model on disk is: family, decoder, context, parameters, dtype, size, image tokens, chat template, revision.

    llava show llava-hf/llava-1.5-7b-hf

    Reads config, processor files and the weights' headers only; nothing is downloaded or loaded.
    """
    from llava_cli.manage.info import run_show

    raise typer.Exit(run_show(model, json_output))


@app.command()
def rm(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Hub id (org/name) in the local cache.", show_default=False)
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a model's snapshots and blobs from the Hugging Face cache (asks first; nothing outside the cache).

    llava rm llava-hf/llava-1.5-7b-hf
    """
    from llava_cli.manage.info import run_rm

    raise typer.Exit(run_rm(model, yes))


@app.command()
def tokens(
    images: Annotated[
        list[str],
        typer.Argument(metavar="IMAGE...", help="Image files, as one prompt would hold them.", show_default=False),
    ],
    model: Annotated[str, typer_option(OPTIONS["model"])[2]] = OPTIONS["model"].default,
    max_image_tokens: Annotated[Optional[int], typer_option(OPTIONS["max_image_tokens"])[2]] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per image.")] = False,
) -> None:
    """What the model sees of each image: original and resized size, anyres grid, image tokens, share of the context.

    llava tokens screenshot.png --model llava-hf/llava-v1.6-mistral-7b-hf

    Needs the model's processor files only, no weights.
    """
    from llava_cli.manage.tokens import run_tokens

    raise typer.Exit(run_tokens(images, Settings(model=model, max_image_tokens=max_image_tokens), json_output))


sessions_app = typer.Typer(help="List, show, export and remove saved conversations.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")
SESSION_REF = typer.Argument(metavar="ID", help="A conversation's id, unique id prefix, or name.", show_default=False)


@sessions_app.command("list")
def sessions_list(json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """Saved conversations, newest first: id, date, turns, model, name, first words."""
    from llava_cli.manage.sessions import list_sessions

    raise typer.Exit(list_sessions(json_output))


@sessions_app.command("show")
def sessions_show(
    ref: Annotated[str, SESSION_REF],
    json_output: Annotated[bool, typer.Option("--json", help="Print the saved file's JSON.")] = False,
) -> None:
    """The transcript of a saved conversation."""
    from llava_cli.manage.sessions import show_session

    raise typer.Exit(show_session(ref, json_output))


@sessions_app.command("rm")
def sessions_rm(ref: Annotated[str, SESSION_REF]) -> None:
    """Delete a saved conversation."""
    from llava_cli.manage.sessions import remove_session

    raise typer.Exit(remove_session(ref))


@sessions_app.command("prune")
def sessions_prune(
    older_than: Annotated[
        Optional[str],
        typer.Option(
            "--older-than",
            metavar="AGE",
            show_default=False,
            help="Remove those last updated more than AGE ago: 30m, 12h, 7d, 2w.",
        ),
    ] = None,
    keep: Annotated[
        Optional[int],
        typer.Option(
            "--keep",
            metavar="N",
            show_default=False,
            help="Keep the N newest, remove the rest (with --older-than: only the old ones among the rest).",
        ),
    ] = None,
) -> None:
    """Remove old unnamed conversations (those given a name with /save NAME stay).

    llava sessions prune --older-than 7d
    llava sessions prune --keep 20
    """
    from llava_cli.manage.sessions import prune_sessions

    raise typer.Exit(prune_sessions(older_than, keep))


@sessions_app.command("export")
def sessions_export(
    ref: Annotated[str, SESSION_REF],
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="markdown|json")] = "markdown",
) -> None:
    """A saved conversation as a Markdown document or as JSON, on stdout."""
    from llava_cli.manage.sessions import export_session

    raise typer.Exit(export_session(ref, fmt))


@app.command("help")
def help_command(
    command: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[COMMAND]...", help="The command to explain, e.g. ask or sessions rm.", show_default=False
        ),
    ] = None,
) -> None:
    """Show the help of llava or of a command, as `llava COMMAND --help` does.

    llava help ask
    """
    raise typer.Exit(preflight(typer.main.get_command(app), [*(command or []), "--help"]))


def show_version(value: bool) -> None:
    if value:
        print(f"llava-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Talk to LLaVA vision-language models on your own machine."""


def main() -> None:
    """Entry point: one line on stderr and a meaningful exit code for every failure."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    try:
        command = typer.main.get_command(app)
        code = preflight(command, sys.argv[1:])
        if code is None:
            code = command.main(args=sys.argv[1:], prog_name="llava", standalone_mode=False)
    except LlavaError as err:
        code = report(err, str(err), err.exit_code)
    except typer.Exit as exit_:
        code = exit_.exit_code
    except typer.TyperException as err:  # what preflight cannot see: a bad value from an environment variable
        code = report(err, err.format_message(), EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        print(file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = close_broken_pipe()
    except Exception as err:  # a bug: still one line, and the way to a traceback for the report
        message = (
            f"unexpected {type(err).__name__}: {one_line(err)} (LLAVA_DEBUG=1 shows the traceback; please report it)"
        )
        code = report(err, message, EXIT_FAILURE)
    sys.exit(code or 0)


def program() -> NoReturn:
    """The `llava` program (`python -m llava_cli`, the console script): `main`, then `exit_now`."""
    try:
        main()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: int | str | None) -> NoReturn:
    """Exit with `code`, without the interpreter's teardown once torch is loaded: freeing a model and
    unloading torch module by module takes seconds (`/quit`, Ctrl-C on `llava serve`; measured by
    bench/exit_speed.py), while by now every answer is written and every conversation saved.
    The exit handlers still run, and the output streams are flushed."""
    if "torch" not in sys.modules or not isinstance(code, (int, type(None))):
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs first: logging's flush, libraries' own handlers
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a stream already closed
            stream.flush()
    os._exit(code or 0)


def report(err: Exception, message: str, code: int) -> int:
    """One line on stderr (escape sequences stripped on a terminal); with LLAVA_DEBUG set, the traceback instead."""
    if os.environ.get("LLAVA_DEBUG"):
        raise err
    emit_error(message)
    return code


def close_broken_pipe() -> int:
    """The reader went away (`| head`): stop quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    return 0
