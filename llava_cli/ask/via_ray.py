"""`llava ask --each ... --ray ADDRESS`: the same batch job as a Ray Data pipeline on a cluster.

A result source, sibling of ask/each.py's local scheduler: `ray_results(...)` returns an iterator of
the scheduler's typed results (engine/scheduler.py's `BatchAnswer`, or the `LlavaError` that failed
that image), one per image, in INPUT order, each exactly once; ask/each.py makes each record from
them with the one function the local `--each` uses, then writes, resumes, counts errors and draws
its progress bar as for a local `--each`. Records are never made on the workers.

- Where: `local` starts a Ray instance on this machine (all its CPUs, no dashboard) and stops it
  at the end; `auto` joins the running cluster (RAY_ADDRESS, or the one `ray start` left here);
  `ray://HOST:PORT` a remote cluster through Ray Client; `HOST:PORT` a cluster's head.
- How: the image list (index, name) is split into blocks; `map_batches` hands them to a pool of
  `--actors N` actors (default: one per GPU / `--gpus-per-actor`, or one per node on a CPU
  cluster), each asking `--gpus-per-actor G` GPUs (default 1 on a cluster with GPUs, else 0) and a
  fraction of a CPU (so a 2-CPU machine still has room for Ray's own work). Each actor loads the
  model once (`load_engine` with the user's `Settings`) and answers `--batch-size` images per
  pass on the scheduler with ask/each.py's `answer_chunk`, passed in as `answer_chunk` (ask/each.py
  imports this module); each typed result crosses back as JSON (`wire`, `unwire`).
- Workers read the images themselves: a path must name the same file on every worker (shared
  storage; a relative path is taken from this command's directory there), or be a URL. An image
  read from stdin (`-`) travels with the job.
- Failures: an image that cannot be used (or a batch that fails: its images are retried one by
  one) is an error result, never a failed job. An actor that dies (killed, out of memory) is
  restarted by Ray and its task retried up to `TASK_RETRIES` times; a block that still fails
  comes back as an error result per image, never a lost line, and the job goes on. A record that
  comes back twice (a retried task) is written once: the driver keeps the images' order by index.
  A model that cannot be loaded on the workers stops the run with its own one-line error and exit
  code; actors that do not start within `ACTOR_START_TIMEOUT_S` (resources the cluster lacks)
  stop it with a one-line error; so does a cluster that cannot be reached.
- Quiet: Ray Data's progress bars and start-up messages are off, its log lines and Ray's stay in
  Ray's log files; stdout carries only the records, stderr only ask/each.py's error lines and
  progress bar (with --verbose, Ray's own log lines too).
- Without Ray installed, `--ray` is a `UsageError` (exit 2) that says how to install it.
  Ray is imported only here and only once `--ray` is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llava_cli.base.errors import LlavaError, UsageError, one_line
from llava_cli.base.settings import Settings
from llava_cli.engine.scheduler import BatchAnswer
from llava_cli.frontend.arguments import AskOptions

if TYPE_CHECKING:
    from llava_cli.engine.local import Engine

LOCAL = "local"
INSTALL_HINT = "--ray needs Ray: pip install 'llava-cli[ray]' (in a clone: pip install -e '.[ray]')"
ACTOR_CPUS = 0.5  # a fraction: whole CPUs for every actor would leave none for Ray's own tasks
TASK_RETRIES = 3  # a block whose actor dies is tried again this often, then its images get errors
ACTOR_START_TIMEOUT_S = 600  # actors (model loaded) must be up by then: else the cluster lacks resources
BATCHES_PER_BLOCK = 4  # a block holds this many --batch-size batches: what one actor task answers

Result = BatchAnswer | LlavaError  # the scheduler's typed result for one image
AnswerChunk = Callable[["Engine", list[str], str, Settings, bytes], list[Result]]  # ask/each.py's answer_chunk


@dataclass(frozen=True)
class ActorPool:
    """The actor pool's shape: how many actors, and what each one asks of the cluster."""

    actors: int
    gpus: float
    cpus: float = ACTOR_CPUS


class WorkerFailure(LlavaError):
    """A failure on the workers that stops the run (the model cannot be loaded there)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ray_results(
    names: list[str],
    prompt: str,
    settings: Settings,
    options: AskOptions,
    stdin_image: bytes,
    answer_chunk: AnswerChunk,
) -> Iterator[Result]:
    """One typed result per name, in order, answered on the Ray cluster at `options.ray`.

    Connects at once (a missing Ray or an unreachable cluster fails before any output, and
    stderr is quieted before the caller draws its progress bar), then returns the results as the
    blocks come back; Ray is shut down (or left) and stderr restored when the iteration ends."""
    if settings.server and not settings.no_server:
        raise UsageError("--ray answers with models loaded on the Ray workers; drop --server")
    ray = import_ray()
    cleanup = ExitStack()
    cleanup.enter_context(cluster_messages_off(ray))
    if not settings.verbose:
        cleanup.enter_context(stderr_for_us_only())
    try:
        connect_ray(ray, options.ray or LOCAL, settings.verbose)
    except BaseException:
        cleanup.close()
        raise
    cleanup.callback(ray.shutdown)
    return answered_in_order(ray, names, prompt, settings, options, stdin_image, answer_chunk, cleanup)


def answered_in_order(
    ray: Any,
    names: list[str],
    prompt: str,
    settings: Settings,
    options: AskOptions,
    stdin_image: bytes,
    answer_chunk: AnswerChunk,
    cleanup: ExitStack,
) -> Iterator[Result]:
    with cleanup:
        try:
            pool = pool_shape(ray, options)
            batches = pipeline(ray, names, prompt, settings, options.batch_size, pool, stdin_image, answer_chunk)
            for index, returned in in_input_order(len(names), indexed_rows(batches)):
                yield checked_result(names[index], returned)
        except LlavaError:
            raise
        except Exception as err:
            raise job_failure(ray, err) from None


def import_ray() -> Any:
    """The `ray` module, or a UsageError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def connect_ray(ray: Any, address: str, verbose: bool) -> None:
    """Start a local Ray instance (`local`) or join the cluster at `address`, quietly."""
    level = logging.INFO if verbose else logging.ERROR
    try:
        with sigterm_handler_kept():
            start_or_join(ray, address, level)
    except Exception as err:
        raise LlavaError(f"--ray {address}: cannot start or reach Ray ({one_line(err)})") from None


def start_or_join(ray: Any, address: str, level: int) -> None:
    if address == LOCAL:
        # address "local": a new instance even when `ray start` left one running here
        ray.init(
            address=LOCAL, num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False, logging_level=level
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=level)


@contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """`ray.init` makes SIGTERM exit at once (status 15), mid-line; ours (ask/one.py) stops the run
    as Ctrl-C does, finished lines written (exit 130): put it back."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def local_cpus() -> int:
    """The CPUs this process may use (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pool_shape(ray: Any, options: AskOptions) -> ActorPool:
    """--actors and --gpus-per-actor, or their defaults read from the cluster's resources."""
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0.0)
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if options.actors is not None:
        return ActorPool(options.actors, gpus)
    if gpus > 0:
        return ActorPool(max(1, int(cluster_gpus // gpus)), gpus)
    return ActorPool(max(1, sum(1 for node in ray.nodes() if node.get("Alive"))), gpus)


def configure_data(ray: Any, verbose: bool) -> None:
    """Ray Data's defaults, changed where they would lose, reorder or hang a batch job."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the records come back in input order
    context.max_errored_blocks = -1  # a block that fails is reported per image, never fails the job
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # no timeout by default: a hang
    context.enable_progress_bars = False  # ask/each.py draws the one progress bar
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console" and not verbose:
            handler.setLevel(logging.CRITICAL)  # its file log in Ray's session folder stays


def pipeline(
    ray: Any,
    names: list[str],
    prompt: str,
    settings: Settings,
    batch_size: int,
    pool: ActorPool,
    stdin_image: bytes,
    answer_chunk: AnswerChunk,
) -> Iterable[dict[str, Any]]:
    """The Ray Data pipeline: (index, name) blocks → the actor pool → batches of (index, result JSON)."""
    configure_data(ray, settings.verbose)
    rows = [{"index": index, "name": encode_name(name)} for index, name in enumerate(names)]
    dataset = ray.data.from_items(rows, override_num_blocks=block_count(len(names), batch_size, pool.actors))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer Ray deprecates passing max_task_retries this way; it still works
        answered = dataset.map_batches(
            ImageAnswerer,
            fn_constructor_args=(settings, prompt, stdin_image, os.getcwd(), answer_chunk),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
            max_restarts=-1,
            max_task_retries=TASK_RETRIES,
        )
    return answered.iter_batches(batch_format="numpy", batch_size=None)


def block_count(images: int, batch_size: int, actors: int) -> int:
    """Blocks of BATCHES_PER_BLOCK batches, but enough of them to keep every actor busy twice over."""
    return max(1, min(images, max(math.ceil(images / (batch_size * BATCHES_PER_BLOCK)), 2 * actors)))


def encode_name(name: str) -> bytes:
    """A name as bytes: a file name that is not UTF-8 (surrogate escapes) travels unchanged."""
    return name.encode("utf-8", "surrogateescape")


class ImageAnswerer:
    """One actor of the pool: the model loaded once, then a batch of images answered per call."""

    def __init__(
        self, settings: Settings, prompt: str, stdin_image: bytes, workdir: str, answer_chunk: AnswerChunk
    ) -> None:
        if os.path.isdir(workdir):
            os.chdir(workdir)  # relative paths (images, a model folder) as the user meant them
        self.settings, self.prompt, self.stdin_image, self.answer_chunk = settings, prompt, stdin_image, answer_chunk
        self.failure: dict[str, Any] | None = None
        try:
            from llava_cli.frontend.startup import load_engine

            self.engine = load_engine(settings)
        except LlavaError as err:  # reported by the driver, which stops the run with it
            self.failure = {"failure": f"on the Ray workers: {err}", "exit_code": err.exit_code}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        names = [bytes(name).decode("utf-8", "surrogateescape") for name in batch["name"]]
        wired = (
            [json.dumps(self.failure)] * len(names) if self.failure else [wire(result) for result in self.answer(names)]
        )
        return {"index": batch["index"], "result": wired}

    def answer(self, names: list[str]) -> list[Result]:
        """The scheduler's results for `names`: the batch at once; if that fails, image by image, so that
        one image's failure is that image's error."""
        try:
            return self.answer_chunk(self.engine, names, self.prompt, self.settings, self.stdin_image)
        except Exception as err:
            if len(names) > 1:
                return [result for name in names for result in self.answer([name])]
            return [
                err if isinstance(err, LlavaError) else LlavaError(f"{names[0]}: {type(err).__name__}: {one_line(err)}")
            ]


def wire(result: Result) -> str:
    """A typed result as JSON, to cross from an actor to the driver (an error keeps its message)."""
    if isinstance(result, LlavaError):
        return json.dumps({"error": str(result)})
    return json.dumps({"answer": dataclasses.asdict(result)})


def unwire(text: str) -> Result:
    """The typed result `wire` sent."""
    sent = json.loads(text)
    if "error" in sent:
        return LlavaError(sent["error"])
    return BatchAnswer(**{**sent["answer"], "videos": tuple(sent["answer"]["videos"])})


def indexed_rows(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[int, str]]:
    for batch in batches:
        yield from zip((int(index) for index in batch["index"]), batch["result"])


def in_input_order(count: int, rows: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str | None]]:
    """(index, result JSON) for 0..count-1, each index once, in order; None for an index that never
    came back. The rows come in input order (preserve_order), so a row past a gap means the block
    in the gap failed for good; a row seen before (a retried task's) is dropped."""
    expected = 0
    for index, text in rows:
        if index < expected or index >= count:
            continue
        for missing in range(expected, index):
            yield missing, None
        yield index, text
        expected = index + 1
    for missing in range(expected, count):
        yield missing, None


def checked_result(name: str, returned: str | None) -> Result:
    """The typed result for image `name` (its result JSON, None when its block was lost); `WorkerFailure`
    when the workers could not load the model."""
    if returned is None:
        return LlavaError(
            f"{name}: no answer came back from the Ray cluster (its block failed {TASK_RETRIES + 1} times); run again to retry it"
        )
    if "failure" in (sent := json.loads(returned)):
        raise WorkerFailure(str(sent["failure"]), int(sent["exit_code"]))
    return unwire(returned)


def job_failure(ray: Any, err: Exception) -> LlavaError:
    """A Ray error that stopped the pipeline, as one line."""
    if isinstance(err, ray.exceptions.GetTimeoutError):
        return LlavaError(
            f"the Ray actors did not start within {ACTOR_START_TIMEOUT_S} s: the cluster lacks the CPUs, GPUs or "
            "memory they ask for; lower --actors or --gpus-per-actor, or add nodes"
        )
    return LlavaError(f"the Ray job failed: {one_line(err)}")


@contextmanager
def cluster_messages_off(ray: Any) -> Iterator[None]:
    """The driver prints the cluster's error messages (a task retried, an actor died) on stdout,
    which carries the records: off, with the switch Ray's own debugger uses (they stay in Ray's
    log files)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    before = getattr(worker, "_worker_logs_enabled", None)
    if before is not None:
        worker._worker_logs_enabled = False
    try:
        yield
    finally:
        if before is not None:
            worker._worker_logs_enabled = before


@contextmanager
def stderr_for_us_only() -> Iterator[None]:
    """Ray's C++ core writes its own log lines to file descriptor 2 (actor restarts, warnings).
    While Ray runs, descriptor 2 goes to /dev/null and `sys.stderr` writes to a copy of the real
    stderr, so only our lines (errors, the progress bar) reach the user. The copy stays open after
    (ask/each.py's progress bar, made while Ray ran, ends after it) and closes with its last user."""
    sys.stderr.flush()
    real = os.dup(2)
    ours = open(real, "w", encoding=sys.stderr.encoding, errors=sys.stderr.errors, buffering=1)  # noqa: SIM115 (it outlives this call: see above)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    original, sys.stderr = sys.stderr, ours
    try:
        yield
    finally:
        ours.flush()
        os.dup2(real, 2)
        sys.stderr = original
