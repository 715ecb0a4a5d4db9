"""Generation: stream the answer to a conversation, paying only for what is new since last turn.

`Engine` is the local `Backend` (engine/backend.py): `Engine.generate(conversation, settings)` yields
`TextChunk`s (joined: exactly the answer with surrounding whitespace stripped), then, once the answer
has been added to the conversation, one `Done` with its figures. If it is stopped, closed early
(Ctrl-C) or raises, no `Done` comes and the conversation keeps its unanswered turn for the caller.
Beyond the protocol, the scheduler (engine/scheduler.py: `llava serve`, `ask --each`) uses its public
`fit`, `encode`, `token_budget`, `image_inputs` and `eos_ids`. Every path draws tokens through
engine/pipeline.py's per-row pipeline (one sampler, one token budget, one stopping rule), so a batch row's
answer is the one `generate` gives that prompt alone, greedy or seeded.

Cache reuse: the engine keeps the KV cache of the tokens it has already run, with their token ids
and the digests of the images they hold. A new prompt keeps the longest common prefix (never
splitting an image, never trusting an image whose content changed), drops the rest of the cache
and runs only the new tokens; the vision tower sees only images that are not in the cache. Greedy
answers are therefore the ones plain `model.generate` gives for the full prompt. How the model runs
over the cache is a `ForwardPath` (engine/paths.py), chosen from the settings of each `generate` call:
on a GPU the default `StaticPath` (engine/graphstep.py: a bucketed static cache, the next token chosen on the
device, a CUDA graph), `EagerPath` on a CPU (faster there) or where the model cannot use it, or `--compile`'s.

Decoding looks one step ahead: the step that feeds token N is launched before token N is read on
the host, so when token N ends the answer, that step fed a token the answer does not use; it is
cropped from the cache. `PrefixCache.ids` always lists exactly the tokens the KV cache holds.

Context: when history plus room for an answer would overflow the window, the oldest whole turns
are dropped (said in a `Note` event); a message that cannot fit alone raises `ContextError`
and leaves the conversation as it was.

Memory: the engine owns the process's `--cache-mb` budget (`budget`, engine/kvbudget.py), which the
scheduler's rows and serve's pool report to as well. `generate` reserves its cache's worst case
(prompt and whole token budget) as `CHAT` before it prefills, and refuses with one line
(`ResourceError`) an answer that cannot fit; forgetting the cache gives the reservation back.

Out of GPU memory in a forward: the cache is freed (`free_memory`) and `ResourceError` raised, naming
the options that help; the conversation keeps its unanswered turn for the caller, as on any error.
Prompt text becomes ids through prompt/prompting.py, where user text can never become a control token.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_cli.base.errors import ContextError, ResourceError
from llava_cli.base.settings import Settings
from llava_cli.engine.backend import BackendInfo, Done, Events, Note, TextChunk, window_within
from llava_cli.engine.graphstep import default_path
from llava_cli.engine.kvbudget import CHAT, KvBudget, budget_for, kv_bytes_per_token, over_budget
from llava_cli.engine.kvrows import nbytes
from llava_cli.engine.logprobs import LogprobHook, logprob_hook
from llava_cli.engine.paths import CompiledPath, ForwardPath, Steps
from llava_cli.engine.pipeline import Row, Sampler, TokenHook, token_budget
from llava_cli.engine.stops import StopHook, StoppedStream
from llava_cli.engine.streaming import Stats, TextStream
from llava_cli.media.images import ImageRef
from llava_cli.models.loader import LoadedModel
from llava_cli.models.vision import VisionInputs, is_video
from llava_cli.prompt.conversation import Conversation
from llava_cli.prompt.prompting import TooLong, expand_images, render_segments, tokenize
from llava_cli.prompt.trimming import TrimSearch

if TYPE_CHECKING:
    from llava_cli.engine.constraints import Grammars


OUT_OF_MEMORY = (
    "out of memory while answering; try --load-4bit, a smaller --max-context, a shorter conversation "
    "(/clear) or a smaller model"
)


def too_long(tokens: str, window: int) -> ContextError:
    return ContextError(
        f"this message needs {tokens} tokens with its images but the context window is {window}; shorten it or attach fewer images"
    )


class Stopped(Exception):
    """`Engine.fit` was told to stop (the answer it was fitting for is no longer wanted)."""


# A history of up to this many characters per token of the window is encoded whole before any
# trimming: that encode is cheap and usually all it takes. A longer one is trimmed from its newest end.
WHOLE_FIRST_CHARS_PER_TOKEN = 8


@dataclass
class Prompt:
    """A rendered, tokenized prompt and where each of its images sits in it."""

    ids: list[int]
    images: list[ImageRef]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens


def dropped_note(dropped: int, window: int) -> str:
    return f"dropped the {dropped} oldest turn(s) to fit the {window}-token context window"


def image_keys(prompt: Prompt) -> list[tuple[str, tuple[int, int]]]:
    """Each image of `prompt` as the cache identifies it: content digest and token span."""
    return [(image.digest, span) for image, span in zip(prompt.images, prompt.image_spans)]


@dataclass
class PrefixCache:
    """The KV cache and exactly which tokens and images it holds."""

    kv: Any = None
    ids: list[int] = field(default_factory=list)
    # Each cached image as `image_keys` gives it: its content and the tokens its features fill (OneVision
    # encodes the same picture with fewer tokens once a prompt holds several, so content alone is not enough).
    images: list[tuple[str, tuple[int, int]]] = field(default_factory=list)

    def reusable_prefix(self, prompt: Prompt) -> int:
        """How many leading tokens of `prompt` the cache already holds, ending on an image boundary."""
        keep = 0
        for cached, new in zip(self.ids, prompt.ids[:-1]):  # always leave a token to run
            if cached != new:
                break
            keep += 1
        for index, (digest, (start, end)) in enumerate(image_keys(prompt)):
            if start >= keep:
                break
            same_image = index < len(self.images) and self.images[index] == (digest, (start, end))
            if not same_image or end > keep:
                return start
        return keep

    def truncate(self, keep: int, prompt: Prompt) -> None:
        self.crop(len(self.ids) - keep)
        del self.ids[keep:]
        self.images = [(digest, span) for digest, span in image_keys(prompt) if span[1] <= keep]

    def crop(self, drop: int) -> None:
        """Drop the KV cache's last `drop` tokens (`ids` is the caller's to keep in step)."""
        if drop and self.kv is not None:
            import torch

            # Under inference mode, like the forwards that filled the cache: on a GPU a StaticCache's
            # write position became an inference tensor there (`.to("cuda")` in its first prefill),
            # and changing one in place outside inference mode raises.
            with torch.inference_mode():
                self.kv.crop(-drop)

    def reset(self) -> None:
        self.kv, self.ids, self.images = None, [], []


class Engine:
    """Answers conversations with a loaded model, reusing the KV cache across turns."""

    def __init__(self, loaded: LoadedModel, cache_mb: int | None = None) -> None:
        self.loaded = loaded
        self.budget: KvBudget = budget_for(
            cache_mb, loaded.device
        )  # --cache-mb, for every holder of KV memory in this process
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.cache = PrefixCache()
        self.vision = VisionInputs(loaded.processor, loaded.family.tiling, loaded.video_frames)
        self.eos_ids = self.end_of_sequence_ids()
        self.path: ForwardPath | None = None  # chosen by the first `generate`, from its settings

    def end_of_sequence_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    def info(self) -> BackendInfo:
        loaded = self.loaded
        return BackendInfo(loaded.name, loaded.device, loaded.dtype, loaded.load_seconds, loaded.context_window)

    def prompt_tokens(self, conversation: Conversation) -> int | None:
        """The conversation's tokens; None when it holds more than the model's window (not counted)."""
        try:
            return (
                len(self.encode(conversation, limit=self.loaded.context_window).ids)
                if conversation.turns or conversation.system
                else 0
            )
        except TooLong:
            return None

    def context_window(self, settings: Settings) -> int:
        return window_within(self.loaded.context_window, settings)

    def video_report(self, prompt: Prompt) -> list[dict[str, Any]]:
        """The prompt's videos as `Stats.videos` reports them: name, frames used, video tokens."""
        return self.vision.video_report(prompt.images, prompt.image_spans)

    def token_budget(self, prompt: Prompt, settings: Settings) -> int:
        """New tokens an answer to `prompt` may have: --max-new-tokens, within the context window."""
        return token_budget(settings, self.context_window(settings), len(prompt.ids))

    def reset(self) -> None:
        """Forget the cache (after /clear, or when memory must be freed)."""
        self.forget_cache()
        self.forget_images()

    def forget_cache(self) -> None:
        """Drop the KV cache and give its reservation back to the budget, all but what the path keeps:
        a static path keeps its bucket (its CUDA graph points at it) until the path itself goes."""
        self.cache.reset()
        kept = getattr(self.path, "cache", None)
        self.budget.hold(CHAT, nbytes(kept) if kept is not None else 0)

    def reserve(self, tokens: int) -> None:
        """Reserve a cache of `tokens` tokens as `CHAT` (the pool's oldest entries go first); `ResourceError` if it cannot fit."""
        wanted = max(kv_bytes_per_token(self.model) * tokens, nbytes(self.cache.kv) if self.cache.kv is not None else 0)
        if not self.budget.make_room(CHAT, wanted):
            raise ResourceError(over_budget(wanted, self.budget))
        self.budget.hold(CHAT, wanted)

    def forget_images(self) -> None:
        """Drop the memo of preprocessed images (it pays off within one chat; a server or a batch sees endless images)."""
        self.vision.clear()

    def decode(self, tokens: list[int]) -> str:
        """A whole answer's text from its tokens, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def detokenizer(self, stops: tuple[str, ...] = ()) -> TextStream | StoppedStream:
        """A new incremental detokenizer for one answer's tokens, ending before the first of `stops`."""
        return StoppedStream(TextStream(self.tokenizer), stops) if stops else TextStream(self.tokenizer)

    def sampler(self, settings: Settings) -> Sampler:
        """A new row's sampler for `settings` (its own seeded generator, on the model's device), with
        the row's hooks (logprobs first, so they see the raw scores; a grammar matcher for `settings.constraint`;
        the stop texts); give its `hooks` to the row's `Row`."""
        hooks: list[TokenHook] = [] if settings.logprobs is None else [LogprobHook(self.tokenizer, settings.logprobs)]
        if settings.constraint:
            hooks.append(self.grammars.hook(settings.constraint))
        if settings.stop:
            hooks.append(StopHook(self.tokenizer, settings.stop))
        return Sampler(settings, self.loaded.device, hooks)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """This engine's compiled grammars (built on the first constrained answer)."""
        from llava_cli.engine.constraints import Grammars

        return Grammars(self.tokenizer, self.model.config.get_text_config().vocab_size)

    def use_path_for(self, settings: Settings) -> None:
        """Switch to the forward path `settings` asks for (`--compile`, `--no-cuda-graph` or not); a switch empties the cache."""
        window = self.context_window(settings)
        if self.path is None or not self.path.suits(settings, window):
            self.forget_cache()
            self.path = (
                CompiledPath(self.model, window) if settings.compile else default_path(self.model, settings, window)
            )

    def generate(
        self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False
    ) -> Events:
        """Stream the answer; `stop()` is asked before each step (fitting, prefill, every token), and
        when it says True the generator ends at once with the conversation's turn left unanswered."""
        started = time.perf_counter()
        self.reset_peak_memory()
        stats = Stats(load_s=self.loaded.load_seconds)
        self.use_path_for(settings)
        try:
            prompt, stats.dropped_turns = self.fit(conversation, settings, stop)
        except Stopped:
            return
        if stop():
            return
        if stats.dropped_turns:
            yield Note(dropped_note(stats.dropped_turns, self.context_window(settings)))
        keep = self.cache.reusable_prefix(prompt)
        self.cache.truncate(keep, prompt)
        stats.prompt_tokens, stats.cached_tokens = len(prompt.ids), keep
        stats.videos = self.video_report(prompt)
        sampler = self.sampler(settings)
        row = Row(budget=self.token_budget(prompt, settings), hooks=sampler.hooks)
        stream = self.detokenizer(settings.stop)
        self.reserve(len(prompt.ids) + row.budget)
        with self.guarded():  # a bigger bucket may not fit in memory
            self.cache.kv = self.path.cache_for(self.cache.kv, keep, len(prompt.ids) + row.budget)
        self.budget.hold(
            CHAT, max(self.budget.held[CHAT], nbytes(self.cache.kv))
        )  # a static bucket may be larger than asked
        logits = self.run(prompt.ids[keep:], self.image_inputs(prompt, keep))
        self.cache.images = image_keys(prompt)
        stats.ttft_s = time.perf_counter() - started
        with self.guarded():
            steps = self.path.steps(self.cache.kv, logits, len(self.cache.ids), sampler, self.eos_ids)
        while not row.finish_reason:
            if stop():
                return
            token = self.next_token(steps, row)
            if token in self.eos_ids:
                break
            if chunk := stream.push(token):
                yield TextChunk(chunk)
        if settings.verbose:
            yield from (Note(note) for note in self.path.take_notes())
        else:
            self.path.take_notes()  # each said once, and only with --verbose
        if tail := stream.finish():
            yield TextChunk(tail)
        stats.end(len(row.tokens), row.finish_reason, time.perf_counter() - started, self.peak_memory_mb())
        recorded = logprob_hook(sampler.hooks)
        yield Done(stats, tuple(recorded.tokens) if recorded else (), answer=stream.text.strip())

    def fit(
        self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False
    ) -> tuple[Prompt, int]:
        """Encode the conversation, dropping its oldest turns until it fits the context window.

        The conversation is not changed. The result is the prompt without the smallest number of
        oldest turns whose removal leaves room for an answer
        (all but the last turn when nothing fits), found with a few encodes (`TrimSearch`) instead of
        one encode per dropped turn. Raises `Stopped` when `stop()` says so between two encodes.
        """
        if not conversation.pending:
            raise ValueError("generate() needs a conversation whose last message awaits an answer")
        window = self.context_window(settings)
        answer_room = min(settings.max_new_tokens, window // 2)

        def encode_without(dropped: int) -> Prompt:
            if stop():
                raise Stopped
            return self.encode(conversation.without_oldest(dropped), limit=window - 1)  # TooLong: it cannot fit

        search = TrimSearch(encode_without, window - answer_room)
        history_chars = sum(len(turn.text) + len(turn.answer or "") for turn in conversation.turns)
        whole_first = history_chars <= WHOLE_FIRST_CHARS_PER_TOKEN * window
        dropped = search.fewest_drops([len(turn.images) for turn in conversation.turns], whole_first)
        try:
            prompt = search.prompt(dropped)
        except TooLong as err:
            raise too_long(f"at least {err.at_least}", window) from None
        if len(prompt.ids) >= window:
            raise too_long(str(len(prompt.ids)), window)
        return prompt, dropped

    def encode(self, conversation: Conversation, limit: int | None = None) -> Prompt:
        """Render, widen each image (and video) placeholder to its tokens, tokenize (user text stays text);
        `TooLong` (prompt/prompting.py), before tokenizing, when the prompt cannot fit in `limit` tokens."""
        media = conversation.images
        counts = self.vision.token_counts(media)  # first: it refuses a video this model cannot take
        videos = [is_video(item) for item in media]
        image_counts = [count for count, video in zip(counts, videos) if not video]
        video_counts = [count for count, video in zip(counts, videos) if video]
        segments = expand_images(
            render_segments(self.loaded.prompt_format, conversation), self.processor.image_token, image_counts
        )
        if video_counts:
            segments = expand_images(segments, self.processor.video_token, video_counts)
        ids = tokenize(self.tokenizer, segments, limit)
        image_spans = iter(self.image_spans(ids, image_counts, self.model.config.image_token_id))
        video_spans = iter(
            self.image_spans(ids, video_counts, self.tokenizer.convert_tokens_to_ids(self.processor.video_token))
            if video_counts
            else []
        )
        spans = [next(video_spans) if video else next(image_spans) for video in videos]
        ordered = sorted(zip(spans, media), key=lambda pair: pair[0][0])  # the template decides where each sits
        return Prompt(ids=ids, images=[item for _, item in ordered], image_spans=[span for span, _ in ordered])

    def image_spans(self, ids: list[int], counts: list[int], token_id: int) -> list[tuple[int, int]]:
        positions = [i for i, token in enumerate(ids) if token == token_id]
        spans, offset = [], 0
        for count in counts:
            spans.append((positions[offset], positions[offset + count - 1] + 1))
            offset += count
        return spans

    def image_inputs(self, prompt: Prompt, keep: int) -> dict[str, Any]:
        """The forward's image arguments for the images after the first `keep` tokens, on the model's device."""
        cached = sum(1 for start, _ in prompt.image_spans if start < keep)
        inputs = self.vision.model_inputs(prompt.images, skip=cached)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs:
                inputs[name] = inputs[name].to(self.model.dtype)
        return {name: value.to(self.model.device) for name, value in inputs.items()}

    def run(self, ids: list[int], image_inputs: dict[str, Any]) -> Any:
        """Run `ids` (and the images in `image_inputs`) after what is cached; the logits for the next token."""
        with self.guarded():
            logits = self.path(self.cache.kv, ids, len(self.cache.ids), image_inputs)
        self.cache.ids.extend(ids)
        return logits

    def next_token(self, steps: Steps, row: Row) -> int:
        """Launch the next step unless the token about to be read is the answer's last by count
        (look-ahead), then read that token into `row`, keeping `cache.ids` what the cache holds."""
        with self.guarded():
            fed = steps.launch() if len(row.tokens) + 1 < row.budget else False
            token = steps.read()
        row.take(token, self.eos_ids)
        if fed and row.finish_reason == "stop":
            self.cache.crop(1)  # the end-of-sequence token the look-ahead step fed
        elif fed:
            self.cache.ids.append(token)
        return token

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Around anything that runs the model: a failure empties the cache, out of memory frees it."""
        try:
            yield
        except BaseException as err:
            self.forget_cache()  # an interrupted forward may have updated only some layers
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                self.free_memory()
                raise ResourceError(OUT_OF_MEMORY) from None
            raise

    def free_memory(self) -> None:
        """Give back what the cache and the image memo hold, so the next message has room."""
        self.path = None  # and its static cache; the next answer makes a path again
        self.reset()
        if self.loaded.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.loaded.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_memory_mb(self) -> float:
        if self.loaded.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
