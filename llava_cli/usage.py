"""Help pages and usage errors, answered from the command tree before typer processes anything.

typer converts every option value through pydantic and draws its help with Rich, a few tenths of
a second that a `--help` or a typo should not cost. `preflight(group, argv)` runs click's own
option parser (the one typer uses, without value conversion) over the command line and:
- prints the help page of the command named (`-h`/`--help`, or a group given no command), returns 0;
- raises `UsageError` (one line, exit 2) for an unknown command or option, with a did-you-mean
  found by difflib among that command's real names, an option missing its value, a value that is
  not a number where one is needed, a model or generation option `Settings` refuses, a missing
  or unexpected argument, and what `ask` and `chat` refuse of their own options together;
- returns None for a well-formed command line, which typer then runs.

A help page reads like a man page: a usage line, the description, the options grouped by panel,
each with its metavar (IMAGE, TEXT, N, FILE, URL...), then examples; wrapped to the terminal's
width (at least 40 columns) between words, never inside one.

Why not click's own hooks (a Group subclass catching `UsageError` from `main(standalone_mode=False)`):
typer coerces a parameter through pydantic as soon as the top group processes its own options,
before any subcommand or hook sees the rest, so an answer from there costs the pydantic import
(`llava ask --help` and `llava ask --temprature ...`: 0.13 s instead of 0.07 s); and click's
`NoSuchOption.possibilities` covers only long options, where these messages suggest any name.
"""

from __future__ import annotations

import re
import shutil
import textwrap
import typing
from typing import Any

import typer

from llava_cli.base.errors import EXIT_OK, UsageError, suggestion
from llava_cli.base.options import OPTIONS
from llava_cli.base.settings import Settings
from llava_cli.base.terminal import table

MIN_WIDTH, MAX_WIDTH = 40, 100
GENERAL_PANEL = "Options"
EXAMPLE = re.compile(r"^(llava|echo|cat|find) ")
METAVARS = {str: "TEXT", int: "N", float: "NUMBER"}  # for options that do not name their own


def preflight(group: Any, argv: list[str], prog: str = "llava") -> int | None:
    """Help (returns 0) or a `UsageError` for `argv`; None when typer should run it."""
    command, path, args, context = group, [prog], list(argv), None
    while True:
        context = make_context(command, path[-1], context)
        options, positional = parse(command, context, args, " ".join(path))
        if options.get("help") or (is_group(command) and not positional and not options):
            print(help_page(command, context, " ".join(path), width()))
            return EXIT_OK
        if not is_group(command):
            check_values(command, options)
            check_settings(command, options)
            check_arguments(command, options, positional, " ".join(path))
            check_command(command.name, options)
            return None
        if not positional:
            return None  # options only (--version): typer answers them
        name, args = positional[0], positional[1:]
        if name not in command.commands:
            raise UsageError(f"no such command '{name}' in '{' '.join(path)}'{suggestion(name, command.commands)}")
        command, path = command.commands[name], [*path, name]


def make_context(command: Any, name: str, parent: Any = None) -> Any:
    """A context as click makes one for `command` (settings such as -h inherited), processing nothing."""
    return typer.Context(command, info_name=name, parent=parent, **(command.context_settings or {}))


def is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def parse(command: Any, context: Any, args: list[str], where: str) -> tuple[dict[str, Any], list[str]]:
    """click's parse of `args` for `command`: (option and argument values by name, what is left over)."""
    try:
        options, positional, _ = command.make_parser(context).parse_args(args)
    except typer.TyperException as err:
        raise UsageError(parse_error(command, context, err, where)) from None
    return options, positional


def parse_error(command: Any, context: Any, err: Any, where: str) -> str:
    option = getattr(err, "option_name", None)
    if option and "requires" in err.format_message():
        return f"{option} needs a value: {where} {option} {metavar(find_option(command, option))}"
    if option and "does not take a value" in err.format_message():
        return f"{option.split('=')[0]} is a flag and takes no value"
    if option and is_group(command) and takes_option(command, option):  # `llava --model M ask`
        return f"{option} goes after the command: {where} COMMAND {option} ..."
    if option:
        names = [name for param in command.get_params(context) for name in param.opts if name.startswith("-")]
        return f"no such option {option} for '{where}'{suggestion(option, names)} ({where} --help lists them)"
    return err.format_message()


def takes_option(command: Any, option: str) -> bool:
    """True when `command`, or one of its subcommands, takes `option`."""
    if is_group(command):
        return any(takes_option(sub, option) for sub in command.commands.values())
    return any(option in param.opts for param in command.params)


def find_option(command: Any, name: str) -> Any:
    return next(param for param in command.params if name in param.opts)


def value_type(param: Any) -> Any:
    """The plain type of an option's values: `int` for Optional[int] and list[int]."""
    annotation = param.type_descriptor.annotation
    while typing.get_origin(annotation) is not None:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def check_values(command: Any, options: dict[str, Any]) -> None:
    """Numbers where numbers are needed, checked as typer would, without typer's cost."""
    for param in command.params:
        kind = value_type(param)
        if param.name not in options or kind not in (int, float) or getattr(param, "is_flag", False):
            continue
        values = options[param.name]
        for value in values if isinstance(values, (list, tuple)) else [values]:
            try:
                kind(value)
            except ValueError:
                wanted = "a whole number" if kind is int else "a number"
                raise UsageError(f"{param.opts[0]} wants {wanted} (got {value!r})") from None


def check_settings(command: Any, options: dict[str, Any]) -> None:
    """The model and generation options given, validated by `Settings` as the command will
    (choices, ranges, exclusions); values from the environment are left to the command."""
    given = {}
    for param in command.params:
        option = OPTIONS.get(param.name)
        if option is not None and options.get(param.name) is not None:
            given[param.name] = option.kind(options[param.name]) if option.kind in (int, float) else options[param.name]
    Settings(**given)


def check_command(name: str, options: dict[str, Any]) -> None:
    """What `ask` and `chat` check of their own options together, through the same code the commands run."""
    if name in ("ask", "chat"):
        from llava_cli.frontend.arguments import AskOptions, check_chat_arguments  # only here: it costs tens of ms

        (AskOptions.from_command_line if name == "ask" else check_chat_arguments)(options)


def check_arguments(command: Any, values: dict[str, Any], left_over: list[str], where: str) -> None:
    """Every required argument given, none too many (click's parser fills arguments in `values`)."""
    missing = [
        param for param in command.params if is_argument(param) and param.required and values.get(param.name) is None
    ]
    if missing:
        raise UsageError(f"missing {missing[0].metavar or missing[0].name.upper()}: {where} {usage_arguments(command)}")
    if left_over:
        takes = usage_arguments(command)
        raise UsageError(f"unexpected argument '{left_over[0]}': {where} takes {takes or 'no arguments'}")


def is_argument(param: Any) -> bool:
    return not param.opts[0].startswith("-")


def width() -> int:
    return max(MIN_WIDTH, min(shutil.get_terminal_size((80, 24)).columns, MAX_WIDTH))


def metavar(param: Any) -> str:
    """What follows an option's name in help: its metavar, nothing for a flag."""
    if getattr(param, "is_flag", False):
        return ""
    return param.metavar or METAVARS.get(value_type(param), "TEXT")


def usage_arguments(command: Any) -> str:
    names = []
    for param in command.params:
        if not is_argument(param):
            continue
        name = param.metavar or param.name.upper()
        names.append(name if param.required or param.nargs == -1 else f"[{name}]")
    return " ".join(names)


def help_page(command: Any, context: Any, where: str, columns: int) -> str:
    """The whole help page of `command`, invoked as `where`, wrapped to `columns`."""
    if is_group(command):
        usage = f"{where} [OPTIONS] COMMAND [ARGS]"
    else:
        usage = f"{where} [OPTIONS] {usage_arguments(command)}".rstrip()
    text, examples = description(command.help or "")
    lines = [*wrap(f"Usage: {usage}", columns, "", "    "), ""]
    lines += [line for paragraph in text for line in [*wrap(paragraph, columns, "  ", "  "), ""]]
    for title, rows in sections(command, context):
        lines += [f"{title}:", *table(rows, columns), ""]
    if examples:
        lines += ["Examples:", *(f"  {example}" for example in examples), ""]
    return "\n".join(lines).rstrip("\n")


def description(help_text: str) -> tuple[list[str], list[str]]:
    """The help text's paragraphs, and its example command lines apart."""
    paragraphs = [" ".join(block.split()) for block in help_text.strip().split("\n\n") if block.strip()]
    examples = [paragraph for paragraph in paragraphs if EXAMPLE.match(paragraph)]
    return [paragraph for paragraph in paragraphs if paragraph not in examples], examples


def sections(command: Any, context: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(term, help)]) for the commands, arguments and each panel of options, in order."""
    found: dict[str, list[tuple[str, str]]] = {}
    if is_group(command):
        found["Commands"] = [(name, sub.get_short_help_str(200)) for name, sub in command.commands.items()]
    for param in command.get_params(context):
        if getattr(param, "hidden", False):
            continue
        if is_argument(param):
            found.setdefault("Arguments", []).append((param.metavar or param.name.upper(), param.help or ""))
            continue
        panel = getattr(param, "rich_help_panel", None) or GENERAL_PANEL
        found.setdefault(panel, []).append((option_term(param), option_help(param)))
    return list(found.items())


def option_term(param: Any) -> str:
    names = sorted(param.opts, key=lambda name: name.startswith("--"))  # -m, --model
    return f"{', '.join(names)} {metavar(param)}".rstrip()


def option_help(param: Any) -> str:
    notes = []
    if param.envvar:
        notes.append(f"env {param.envvar}")
    if param.show_default and not getattr(param, "is_flag", False) and param.default not in (None, [], ()):
        notes.append(f"default {param.default}")
    return f"{param.help or ''}" + (f" [{'; '.join(notes)}]" if notes else "")


def wrap(text: str, columns: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, columns, initial_indent=first, subsequent_indent=rest, break_long_words=False, break_on_hyphens=False
    )
