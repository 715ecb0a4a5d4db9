"""`llava ask --each IMAGE...` / `--from-file FILE`: one question for many images, answered one by one.

Every image gets its own answer, in input order, as one record per line (`frontend/records.py` has the
keys): JSON lines on stdout or appended to `-o FILE`, or `IMAGE<TAB>ANSWER` text lines (frontend/output.py). An image
that cannot be used (missing, broken, a URL that fails, too long for the context) gets a record
carrying its `error` and a line on stderr; the batch goes on and the exit code is 1 at the end.
`--batch-size N` decodes up to N images at once on the engine's scheduler (engine/scheduler.py), admitted
continuously: an image whose answer ends is replaced at once by the next, so no image waits for
the longest answer of a fixed batch. Answers are the same as one at a time (greedy, or sampled
with the same --seed); a record's `seconds` runs from its image's admission to its last token. With a server (--server, or a
running `llava serve` for the model, as `llava ask` finds one) the records come from
ask/via_server.py instead, `--parallel N` requests at once, with the same lines, order and exit codes. With `-o FILE`, images already answered there for the same
prompt are skipped, so an interrupted run is finished by running the same command again.

stderr carries only error lines, plus a progress bar when stderr is a terminal and there is
more than one image to answer. Images are read lazily, as their rows are admitted, so memory does not
grow with the number of images. Failures that are not about one image (the model cannot be
loaded, the output cannot be written) stop the run, with every finished line already written.
With `--ray ADDRESS` the records come from a Ray Data pipeline on a cluster instead (ask/via_ray.py):
the same lines, order, resume, errors and exit codes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_cli.ask.via_server import batch_server, server_records
from llava_cli.base.errors import EXIT_FAILURE, EXIT_OK, ContextError, LlavaError, UsageError
from llava_cli.base.safeio import NotRegularFile, read_regular
from llava_cli.base.settings import DEFAULT_PARALLEL, Settings
from llava_cli.base.terminal import emit, is_terminal, make_console, progress_bar
from llava_cli.engine.constraints import parsed_answer
from llava_cli.engine.local import Engine
from llava_cli.engine.logprobs import as_openai
from llava_cli.engine.runner import Prompt
from llava_cli.engine.scheduler import BatchAnswer, answers_in_order
from llava_cli.frontend.arguments import (
    STDIN,
    AskOptions,
    folder_images,
    image_argument,
    images_and_prompt,
    read_image_from_stdin,
    read_prompt_from_stdin,
)
from llava_cli.frontend.output import StdoutRecords
from llava_cli.frontend.records import CsvFile, RecordFile, make_record
from llava_cli.frontend.startup import load_engine
from llava_cli.prompt.conversation import Conversation
from llava_cli.prompt.prompting import TooLong

MAX_LIST_BYTES = 64 * 1024 * 1024  # --from-file: about a million paths


def run_batch(args: list[str], settings: Settings, options: AskOptions) -> int:
    """Answer `prompt` for every image; 0 when all were answered, 1 when any failed."""
    names, prompt = batch_inputs(args, options)
    stdin_image = read_image_from_stdin() if STDIN in names else b""
    sink = output_sink(options, settings)
    try:
        todo = [name for name in names if not sink.answered(name, prompt)]
        if len(todo) < len(names):
            emit(
                f"llava: skipping {len(names) - len(todo)} of {len(names)} images, already answered in {options.output}",
                sys.stderr,
            )
        if not todo:
            return EXIT_OK
        return answer_all(todo, prompt, settings, options, sink, stdin_image, skipped=len(names) - len(todo))
    finally:
        sink.close()


def output_sink(options: AskOptions, settings: Settings) -> StdoutRecords | RecordFile | CsvFile:
    """Where the records go: stdout in the output format, or -o's resumable file (JSON lines, or CSV)."""
    if options.output is None:
        return StdoutRecords(options.format, settings.raw, settings.constraint)
    if options.format == "csv":
        return CsvFile(Path(options.output), settings.constraint)
    return RecordFile(Path(options.output))


def stop_message(done: int, total: int, output: str | None) -> str:
    """What Ctrl-C (or SIGTERM) leaves: how far the run got and how to finish it."""
    how = (
        f"rerun the same command to resume (the answers so far are in {output})"
        if output
        else "rerun with -o FILE to resume"
    )
    return f"llava: stopped at {done}/{total}; {how}"


def batch_inputs(args: list[str], options: AskOptions) -> tuple[list[str], str]:
    """The image names (arguments, then --from-file lines) and the prompt, from wherever they come."""
    names, prompt = images_and_prompt(args, options.prompt, "llava ask --each", each=True)
    stdin_uses = [options.from_file == STDIN, STDIN in names, prompt is None]
    if sum(stdin_uses) > 1:
        raise UsageError(
            "stdin can carry the image list (--from-file -), an image (-) or the prompt, only one; give the prompt with -p"
        )
    if options.from_file is not None:
        names += read_image_list(options.from_file)
    names, skipped = folder_images(names, options.recursive)
    for note in skipped:
        emit(f"llava: {note}", sys.stderr)
    if not names:
        raise UsageError("no images: list them after --each, or one per line in the --from-file file")
    return names, prompt if prompt is not None else read_prompt_from_stdin()


def read_image_list(source: str) -> list[str]:
    """One image per line of `source` (`-`: stdin); blank lines are skipped.

    A named list must be a regular file of at most MAX_LIST_BYTES (read through safeio: a FIFO or
    /dev/zero is refused at once instead of hanging or filling the memory)."""
    if source == STDIN and is_terminal(sys.stdin):
        raise UsageError("--from-file - reads the image list from stdin, but stdin is a terminal: pipe it in")
    try:
        data = sys.stdin.buffer.read() if source == STDIN else read_regular(source, MAX_LIST_BYTES)
    except FileNotFoundError:
        raise UsageError(f"--from-file {source}: no such file") from None
    except NotRegularFile as err:
        raise UsageError(f"--from-file {source}: {err.strerror}; pipe a list in with --from-file -") from None
    except OSError as err:
        raise UsageError(f"--from-file {source}: cannot read it ({err.strerror or err})") from None
    # File names need not be UTF-8: undecodable bytes pass through as they do in arguments.
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    return [line.strip() for line in lines if line.strip()]


def answer_all(
    names: list[str],
    prompt: str,
    settings: Settings,
    options: AskOptions,
    sink: StdoutRecords | RecordFile | CsvFile,
    stdin_image: bytes,
    skipped: int = 0,
) -> int:
    """Answer `names` (`skipped` more were answered before, in -o's file); Ctrl-C says where it stopped."""
    failed = written = 0
    records = record_source(names, prompt, settings, options, stdin_image)
    try:
        with BatchProgress(len(names)) as progress:
            for record in records:
                if isinstance(sink, StdoutRecords):
                    progress.before_output()
                sink.write(record)
                written += 1
                if record["error"] is not None:
                    failed += 1
                    progress.report(f"llava: error: {record['error']}")
                progress.advance()
    except KeyboardInterrupt:
        emit(stop_message(skipped + written, skipped + len(names), options.output), sys.stderr)
        raise
    return EXIT_FAILURE if failed else EXIT_OK


def record_source(
    names: list[str], prompt: str, settings: Settings, options: AskOptions, stdin_image: bytes
) -> Iterator[dict[str, Any]]:
    """The records of a Ray cluster with --ray (ask/via_ray.py), of a server when one is named or running
    for the model (ask/via_server.py), else of a model loaded here; under a schema with parsed answers."""
    if options.ray is not None:
        from llava_cli.ask.via_ray import ray_results

        results = ray_results(names, prompt, settings, options, stdin_image, answer_chunk)
        records: Iterator[dict[str, Any]] = (
            record_of(name, prompt, settings, result) for name, result in zip(names, results)
        )
    elif (remote := batch_server(settings, options)) is not None:
        records = server_records(remote, names, prompt, settings, options.parallel or DEFAULT_PARALLEL, stdin_image)
    else:
        records = local_records(names, prompt, settings, options.batch_size, stdin_image)
    return with_parsed_answers(records) if settings.constraint else records


def with_parsed_answers(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each answer as its parsed JSON (one place for every record source). An answer cut off before
    its JSON ended (the token budget spent) becomes the image's error, so a rerun with -o tries it again."""
    for record in records:
        if record["error"] is None and isinstance(record["answer"], str):
            try:
                record["answer"] = parsed_answer(record["answer"])
            except LlavaError as err:
                record.update(answer=None, error=f"{record['image']}: {err}")
        yield record


def local_records(
    names: list[str], prompt: str, settings: Settings, batch_size: int, stdin_image: bytes
) -> Iterator[dict[str, Any]]:
    """One record per name, in order, answered by a model loaded here, up to `batch_size` images decoding at once."""
    engine = load_engine(settings)  # batching needs the model itself
    return answered_records(engine, names, prompt, settings, stdin_image, batch_size)


def answer_chunk(
    engine: Engine, names: list[str], prompt: str, settings: Settings, stdin_image: bytes
) -> list[BatchAnswer | LlavaError]:
    """The scheduler's typed results for `names`, in order, all decoding at once (a Ray actor's batch)."""
    return list(scheduled(engine, names, prompt, settings, stdin_image, len(names)))


def answered_records(
    engine: Engine, names: list[str], prompt: str, settings: Settings, stdin_image: bytes, rows: int
) -> Iterator[dict[str, Any]]:
    """Records for `names`, in order, from the scheduler's results."""
    for name, result in zip(names, scheduled(engine, names, prompt, settings, stdin_image, rows)):
        yield record_of(name, prompt, settings, result)


def scheduled(
    engine: Engine, names: list[str], prompt: str, settings: Settings, stdin_image: bytes, rows: int
) -> Iterator[BatchAnswer | LlavaError]:
    """The typed results for `names`, in order, from the continuous scheduler (engine/scheduler.py's
    `answers_in_order`): each image is read when its row is admitted, and a row that ends is replaced at once."""
    makers = [functools.partial(encode, engine, name, prompt, settings, stdin_image) for name in names]
    return answers_in_order(engine, makers, settings, rows)


def record_of(name: str, prompt: str, settings: Settings, result: BatchAnswer | LlavaError) -> dict[str, Any]:
    """The record of one image from its typed result, local or from a Ray actor."""
    if isinstance(result, LlavaError):
        return make_record(name, prompt, settings.model, error=str(result))
    return each_record(name, prompt, settings, result)


def encode(engine: Engine, name: str, prompt: str, settings: Settings, stdin_image: bytes) -> Prompt:
    """Read the image and encode the single-turn question about it; LlavaError if it cannot be used."""
    image = image_argument(name, stdin_image, settings)
    conversation = Conversation(system=settings.system)
    conversation.ask(prompt, [image])
    window = engine.context_window(settings)
    try:
        encoded = engine.encode(conversation, limit=window - 1)  # a prompt of `window` tokens leaves no room
    except TooLong as err:
        raise too_long(name, f"at least {err.at_least}", window) from None
    if engine.token_budget(encoded, settings) < 1:
        raise too_long(name, str(len(encoded.ids)), window)
    return encoded


def too_long(name: str, tokens: str, window: int) -> ContextError:
    return ContextError(f"{name}: the prompt with its image needs {tokens} tokens but the context window is {window}")


def each_record(name: str, prompt: str, settings: Settings, answer: BatchAnswer) -> dict[str, Any]:
    return make_record(
        name,
        prompt,
        settings.model,
        answer=answer.text,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        seconds=round(answer.seconds, 4),
        finish_reason=answer.finish_reason,
        **({"videos": list(answer.videos)} if answer.videos else {}),  # a clip's frames and video tokens
        **({"logprobs": as_openai(answer.logprobs)} if answer.logprobs is not None else {}),  # --logprobs N
    )


class BatchProgress:
    """A progress bar (count, rate, ETA) on stderr when it is a terminal and there are 2+ images.

    Redrawn only when an image is done (no refresh thread), so the lines written to stdout on
    the same terminal never interleave with it: `before_output` clears the bar's line first.
    """

    def __init__(self, total: int, console: Any = None) -> None:
        self.bar = None
        if total > 1 and (console is not None or is_terminal(sys.stderr)):
            self.bar = make_progress(console or make_console(sys.stderr))
            self.task = self.bar.add_task("answering", total=total)

    def __enter__(self) -> BatchProgress:
        if self.bar is not None:
            self.bar.start()
            self.bar.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def before_output(self) -> None:
        """Call before writing to stdout: when it shares the terminal, the bar's line is cleared."""
        if self.bar is not None and is_terminal(sys.stdout):
            self.bar.console.file.write("\r\x1b[2K")
            self.bar.console.file.flush()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
            self.bar.refresh()

    def report(self, message: str) -> None:
        """An error line on stderr (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            emit(message, sys.stderr, flush=True)


def make_progress(console: Any) -> Any:
    from rich.progress import MofNCompleteColumn, ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} images/s" if speed else "… images/s")

    return progress_bar(console, MofNCompleteColumn(), RateColumn(), auto_refresh=False)  # drawn only between lines
