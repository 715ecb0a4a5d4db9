"""The loaded model's side of answering, shared by every decoding front of the engine.

`Runner` holds the loaded model and makes what each answer (a scheduler row, engine/scheduler.py)
needs of it: the prompt (`fit`: the conversation rendered and tokenized, its oldest turns dropped
until it fits the context window; `encode`), the forward's image inputs (`image_inputs`), the row's
sampler and hooks (`sampler`), its token budget, the end-of-sequence ids, and the process's one
`--cache-mb` budget (`budget`, engine/kvbudget.py). It never runs a decode step and never prints.

- `Prompt`: a rendered, tokenized prompt and where each image sits in it.
- `PrefixCache`: a one-row KV cache (engine/kvrows.py) with exactly the token ids and image keys it
  holds; `reusable_prefix(prompt)` is how many leading tokens of `prompt` it can give (never splitting
  an image, never trusting an image whose content changed, always leaving a token to run).

Context: when history plus room for an answer would overflow the window, the oldest whole turns
are dropped (the caller says so: `dropped_note`); a message that cannot fit alone raises
`ContextError` and leaves the conversation as it was.
Prompt text becomes ids through prompt/prompting.py, where user text can never become a control token.

Imports: engine leaves (kvbudget, kvrows, pipeline, logprobs, stops, streaming, constraints), models/,
prompt/, media/, base/.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_cli.base.errors import ContextError
from llava_cli.base.settings import Settings
from llava_cli.engine.backend import BackendInfo, window_within
from llava_cli.engine.kvbudget import KvBudget, budget_for
from llava_cli.engine.logprobs import LogprobHook
from llava_cli.engine.pipeline import Sampler, TokenHook, token_budget
from llava_cli.engine.stops import StopHook, StoppedStream
from llava_cli.engine.streaming import TextStream
from llava_cli.media.attachments import Media
from llava_cli.media.video import VideoRef
from llava_cli.models.loader import LoadedModel
from llava_cli.models.vision import VisionInputs
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
    images: list[Media]
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


class Runner:
    """A loaded model and what every answer needs of it (the module docstring); it runs no decode step."""

    def __init__(self, loaded: LoadedModel, cache_mb: int | None = None) -> None:
        self.loaded = loaded
        self.budget: KvBudget = budget_for(
            cache_mb, loaded.device
        )  # --cache-mb, for every holder of KV memory in this process
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.vision = VisionInputs(loaded.processor, loaded.family.tiling, loaded.video_frames)
        self.eos_ids = self.end_of_sequence_ids()

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
        videos = [isinstance(item, VideoRef) for item in media]
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

    def free_memory(self) -> None:
        """Give back what the image memo and the allocator hold, so the next answer has room."""
        self.forget_images()
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
