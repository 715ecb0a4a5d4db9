"""Generation: stream the answer to a conversation, paying only for what is new since last turn.

`Engine.generate(conversation, settings)` is a generator of text chunks. Joined, the chunks are
exactly the answer with surrounding whitespace stripped; when the generator finishes, that answer
has been added to the conversation and `engine.last_stats` holds its figures. If it is closed early
(Ctrl-C) or raises, the conversation keeps its unanswered turn for the caller to discard.

Cache reuse: the engine keeps the KV cache of the tokens it has already run, with their token ids
and the digests of the images they hold. A new prompt keeps the longest common prefix (never
splitting an image, never trusting an image whose content changed), drops the rest of the cache
and runs only the new tokens; the vision tower sees only images that are not in the cache. Greedy
answers are therefore the ones plain `model.generate` gives for the full prompt. How the model runs
over the cache is a `ForwardPath` (forward.py): the default eager one, or `--compile`'s static
cache with compiled decode steps, chosen from the settings of each `generate` call.

Context: when history plus room for an answer would overflow the window, the oldest whole turns
are dropped (reported through `notify`); a message that cannot fit alone raises `ContextError`
and leaves the conversation as it was.

Out of GPU memory in a forward: the cache is freed (`free_memory`) and `ResourceError` raised, naming
the options that help; the conversation keeps its unanswered turn for the caller, as on any error.
Prompt text becomes ids through prompting.py, where user text can never become a control token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from llava_cli.conversation import Conversation
from llava_cli.errors import ContextError, ResourceError
from llava_cli.forward import EagerPath, ForwardPath, forward_path
from llava_cli.images import ImageRef
from llava_cli.loader import LoadedModel
from llava_cli.prompting import expand_images, render_segments, tokenize
from llava_cli.settings import Settings
from llava_cli.vision import VisionInputs


OUT_OF_MEMORY = (
    "out of memory while answering; try --load-4bit, a smaller --max-context, a shorter conversation "
    "(/clear) or a smaller model"
)


class Stopped(Exception):
    """`Engine.fit` was told to stop (the answer it was fitting for is no longer wanted)."""
# A history of up to this many characters per token of the window is encoded whole before any
# trimming: that encode is cheap and usually all it takes. A longer one is trimmed from its newest end.
WHOLE_FIRST_CHARS_PER_TOKEN = 8


@dataclass
class Stats:
    """Figures for one answer; `as_dict` gives the stable JSON keys."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    load_s: float = 0.0
    peak_memory_mb: float = 0.0
    dropped_turns: int = 0
    finish_reason: str = "stop"

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def stats_line(figures: dict[str, Any]) -> str:
    """One line of an answer's figures (`Stats.as_dict()`), as `--verbose` shows them on stderr."""
    return (
        f"stats: {figures['prompt_tokens']} prompt tokens ({figures['cached_tokens']} cached), "
        f"first token {figures['ttft_s']:.3f}s, {figures['completion_tokens']} tokens at "
        f"{figures['tokens_per_s']:.1f} tokens/s, {figures['seconds']:.2f}s in all, "
        f"peak memory {figures['peak_memory_mb']:.0f} MB"
    )


@dataclass
class Prompt:
    """A rendered, tokenized prompt and where each of its images sits in it."""

    ids: list[int]
    images: list[ImageRef]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens


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
        drop = len(self.ids) - keep
        if drop and self.kv is not None:
            self.kv.crop(-drop)
        del self.ids[keep:]
        self.images = [(digest, span) for digest, span in image_keys(prompt) if span[1] <= keep]

    def reset(self) -> None:
        self.kv, self.ids, self.images = None, [], []


class TextStream:
    """Incremental detokenizer: each pushed token gives the newly visible text, whitespace-stripped.

    Decodes a sliding window of tokens (as text-generation-inference does) so multi-byte characters
    split across tokens are held back until complete, and holds back trailing whitespace so the
    chunks joined equal `decode(all tokens).strip()`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.held_whitespace = ""
        self.text = ""  # what has been handed out so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.release(after[len(before) :])

    def finish(self) -> str:
        """Release what was held back waiting for more tokens (an incomplete character at the end)."""
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return self.release(after[len(before) :]) if len(after) > len(before) else ""

    def release(self, new_text: str) -> str:
        pending = self.held_whitespace + new_text
        if not self.text:
            pending = pending.lstrip()
        visible = pending.rstrip()
        self.held_whitespace = pending[len(visible) :]
        self.text += visible
        return visible

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class Sampler:
    """Greedy argmax at temperature 0, else temperature + top-p sampling with an optional seed."""

    def __init__(self, settings: Settings, device: str) -> None:
        import torch

        self.torch = torch
        self.settings = settings
        self.generator = None
        if not settings.greedy:
            self.generator = torch.Generator(device=device)
            if settings.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(settings.seed)

    def pick(self, logits: Any) -> int:
        torch = self.torch
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.settings.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TrimSearch:
    """The fewest oldest turns to drop so that a conversation's prompt fits in `limit` tokens.

    Dropping a turn never lengthens the text part of a prompt, but the image part can grow: a
    LLaVA-OneVision image is tiled only when it is the prompt's sole image. So the number of turns
    dropped is split into runs over which the prompt keeps 0, 1 or several images; within a run
    the prompt only shrinks as turns are dropped. The runs are tried oldest-first and, in the first
    whose last candidate fits, the smallest fitting candidate is found by galloping back from that
    end: every prompt encoded then is about the window's size, so the cost does not grow with the
    length of the history. The answer is the one trying 0, 1, 2... drops in turn would give.
    """

    def __init__(self, encode: Callable[[int], Prompt], limit: int) -> None:
        self.encode = encode
        self.limit = limit
        self.prompts: dict[int, Prompt] = {}

    def prompt(self, dropped: int) -> Prompt:
        if dropped not in self.prompts:
            self.prompts[dropped] = self.encode(dropped)
        return self.prompts[dropped]

    def fits(self, dropped: int) -> bool:
        return len(self.prompt(dropped).ids) <= self.limit

    def fewest_drops(self, images_per_turn: list[int], whole_first: bool = True) -> int:
        """The smallest count that fits; all but the last turn when none does. `whole_first` tries
        the whole conversation first (the usual case, one encode), worth it unless it is long."""
        if whole_first and self.fits(0):
            return 0
        for first, last in image_runs(images_per_turn):
            if self.fits(last):
                return self.smallest_fitting(first, last)
        return len(images_per_turn) - 1

    def smallest_fitting(self, first: int, last: int) -> int:
        """In [first, last], where `last` fits and fitting is monotone, the smallest count that fits."""
        fitting, step = last, 1
        while fitting - step >= first and self.fits(fitting - step):
            fitting -= step
            step *= 2
        low = max(first, fitting - step)  # candidates below `low` do not fit (or lie outside the run)
        if low < fitting and self.fits(low):
            return low
        while fitting - low > 1:
            middle = (low + fitting) // 2
            if self.fits(middle):
                fitting = middle
            else:
                low = middle
        return fitting


def image_runs(images_per_turn: list[int]) -> list[tuple[int, int]]:
    """Ranges [first, last] of drop counts (0 .. turns-1) over which the kept images stay 0, 1 or several."""
    kept_after: list[int] = []
    remaining = sum(images_per_turn)
    for count in images_per_turn:
        kept_after.append(min(remaining, 2))
        remaining -= count
    runs: list[tuple[int, int]] = []
    for dropped, kind in enumerate(kept_after):
        if runs and kept_after[runs[-1][0]] == kind:
            runs[-1] = (runs[-1][0], dropped)
        else:
            runs.append((dropped, dropped))
    return runs


class Engine:
    """Answers conversations with a loaded model, reusing the KV cache across turns."""

    def __init__(self, loaded: LoadedModel, notify: Callable[[str], None] = lambda message: None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.notify = notify
        self.cache = PrefixCache()
        self.vision = VisionInputs(loaded.processor)
        self.last_stats = Stats(load_s=loaded.load_seconds)
        self.eos_ids = self.end_of_sequence_ids()
        self.path: ForwardPath = EagerPath(self.model)

    def end_of_sequence_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    def context_window(self, settings: Settings) -> int:
        window = self.loaded.context_window
        return min(window, settings.max_context) if settings.max_context else window

    def reset(self) -> None:
        """Forget the cache (after /clear, or when memory must be freed)."""
        self.cache.reset()
        self.vision.clear()

    def use_path_for(self, settings: Settings) -> None:
        """Switch to the forward path `settings` asks for (`--compile` or not); a switch empties the cache."""
        window = self.context_window(settings)
        if not self.path.suits(settings.compile, window):
            self.cache.reset()
            self.path = forward_path(self.model, settings.compile, window)

    def generate(self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
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
        keep = self.cache.reusable_prefix(prompt)
        self.cache.truncate(keep, prompt)
        stats.prompt_tokens, stats.cached_tokens = len(prompt.ids), keep
        budget = min(settings.max_new_tokens, self.context_window(settings) - len(prompt.ids))
        sampler = Sampler(settings, self.loaded.device)
        stream = TextStream(self.tokenizer)
        logits = self.run(prompt.ids[keep:], self.image_inputs(prompt, keep))
        self.cache.images = image_keys(prompt)
        stats.ttft_s = time.perf_counter() - started
        stats.finish_reason = "length"
        for step in range(budget):
            if stop():
                return
            token = sampler.pick(logits)
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                break
            stats.completion_tokens += 1
            chunk = stream.push(token)
            if chunk:
                yield chunk
            if step + 1 < budget:
                logits = self.run([token], {})
        if tail := stream.finish():
            yield tail
        conversation.answer(stream.text)
        stats.seconds = time.perf_counter() - started
        decode_seconds = stats.seconds - stats.ttft_s
        stats.tokens_per_s = (stats.completion_tokens - 1) / decode_seconds if stats.completion_tokens > 1 else 0.0
        stats.peak_memory_mb = self.peak_memory_mb()
        self.last_stats = stats

    def fit(self, conversation: Conversation, settings: Settings, stop: Callable[[], bool] = lambda: False) -> tuple[Prompt, int]:
        """Encode the conversation, dropping its oldest turns until it fits the context window.

        The result is the smallest number of oldest turns whose removal leaves room for an answer
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
            return self.encode(conversation.without_oldest(dropped))

        search = TrimSearch(encode_without, window - answer_room)
        history_chars = sum(len(turn.text) + len(turn.answer or "") for turn in conversation.turns)
        whole_first = history_chars <= WHOLE_FIRST_CHARS_PER_TOKEN * window
        dropped = search.fewest_drops([len(turn.images) for turn in conversation.turns], whole_first)
        prompt = search.prompt(dropped)
        if len(prompt.ids) >= window:
            raise ContextError(
                f"this message needs {len(prompt.ids)} tokens with its images but the context window is "
                f"{window}; shorten it or attach fewer images"
            )
        if dropped:
            conversation.drop_oldest(dropped)
            self.notify(f"dropped the {dropped} oldest turn(s) to fit the {window}-token context window")
        return prompt, dropped

    def encode(self, conversation: Conversation) -> Prompt:
        """Render, widen each image placeholder to its image tokens, tokenize (user text stays text)."""
        images = conversation.images
        segments = render_segments(self.loaded.prompt_format, conversation)
        counts = self.vision.token_counts(images)
        ids = tokenize(self.tokenizer, expand_images(segments, self.processor.image_token, counts))
        return Prompt(ids=ids, images=images, image_spans=self.image_spans(ids, counts))

    def image_spans(self, ids: list[int], counts: list[int]) -> list[tuple[int, int]]:
        image_id = self.model.config.image_token_id
        positions = [i for i, token in enumerate(ids) if token == image_id]
        spans, offset = [], 0
        for count in counts:
            spans.append((positions[offset], positions[offset + count - 1] + 1))
            offset += count
        return spans

    def image_inputs(self, prompt: Prompt, keep: int) -> dict[str, Any]:
        """The forward's image arguments for the images after the first `keep` tokens, on the model's device."""
        cached = sum(1 for start, _ in prompt.image_spans if start < keep)
        inputs = self.vision.model_inputs(prompt.images, skip=cached)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return {name: value.to(self.model.device) for name, value in inputs.items()}

    def run(self, ids: list[int], image_inputs: dict[str, Any]) -> Any:
        """Run `ids` (and the images in `image_inputs`) after what is cached; the logits for the next token."""
        if self.cache.kv is None:
            self.cache.kv = self.path.new_cache()
        try:
            logits = self.path(self.cache.kv, ids, len(self.cache.ids), image_inputs)
        except BaseException as err:
            self.cache.reset()  # an interrupted forward may have updated only some layers
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                self.free_memory()
                raise ResourceError(OUT_OF_MEMORY) from None
            raise
        self.cache.ids.extend(ids)
        return logits

    def free_memory(self) -> None:
        """Give back what the cache and the image memo hold, so the next message has room."""
        self.reset()
        self.path = EagerPath(self.model)  # and a --compile cache; the next answer makes it again if asked
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
