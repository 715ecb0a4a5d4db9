"""Generation: stream the answer to a conversation, paying only for what is new since last turn.

`Engine.generate(conversation, settings)` is a generator of text chunks. Joined, the chunks are
exactly the answer with surrounding whitespace stripped; when the generator finishes, that answer
has been added to the conversation and `engine.last_stats` holds its figures. If it is closed early
(Ctrl-C) or raises, the conversation keeps its unanswered turn for the caller to discard.

Cache reuse: the engine keeps the KV cache of the tokens it has already run, with their token ids
and the digests of the images they hold. A new prompt keeps the longest common prefix (never
splitting an image, never trusting an image whose content changed), drops the rest of the cache
and runs only the new tokens; the vision tower sees only images that are not in the cache. Greedy
answers are therefore the ones plain `model.generate` gives for the full prompt.

Context: when history plus room for an answer would overflow the window, the oldest whole turns
are dropped (reported through `notify`); a message that cannot fit alone raises `ContextError`
and leaves the conversation as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from llava_cli.conversation import IMAGE_PLACEHOLDER, Conversation
from llava_cli.errors import ContextError, InputError
from llava_cli.images import ImageRef
from llava_cli.loader import LoadedModel
from llava_cli.settings import Settings


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


@dataclass
class Prompt:
    """A rendered, tokenized prompt and where each of its images sits in it."""

    ids: list[int]
    images: list[ImageRef]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens


@dataclass
class PrefixCache:
    """The KV cache and exactly which tokens and images it holds."""

    kv: Any = None
    ids: list[int] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)

    def reusable_prefix(self, prompt: Prompt) -> int:
        """How many leading tokens of `prompt` the cache already holds, ending on an image boundary."""
        keep = 0
        for cached, new in zip(self.ids, prompt.ids[:-1]):  # always leave a token to run
            if cached != new:
                break
            keep += 1
        for index, (start, end) in enumerate(prompt.image_spans):
            if start >= keep:
                break
            same_image = index < len(self.image_digests) and self.image_digests[index] == prompt.images[index].digest
            if not same_image or end > keep:
                return start
        return keep

    def truncate(self, keep: int, prompt: Prompt) -> None:
        drop = len(self.ids) - keep
        if drop and self.kv is not None:
            self.kv.crop(-drop)
        del self.ids[keep:]
        self.image_digests = [image.digest for image, (_, end) in zip(prompt.images, prompt.image_spans) if end <= keep]

    def reset(self) -> None:
        self.kv, self.ids, self.image_digests = None, [], []


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


class Engine:
    """Answers conversations with a loaded model, reusing the KV cache across turns."""

    def __init__(self, loaded: LoadedModel, notify: Callable[[str], None] = lambda message: None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.notify = notify
        self.cache = PrefixCache()
        self.pixel_memo: dict[str, Any] = {}
        self.last_stats = Stats(load_s=loaded.load_seconds)
        self.eos_ids = self.end_of_sequence_ids()

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
        self.pixel_memo.clear()

    def generate(self, conversation: Conversation, settings: Settings) -> Iterator[str]:
        started = time.perf_counter()
        self.reset_peak_memory()
        stats = Stats(load_s=self.loaded.load_seconds)
        prompt, stats.dropped_turns = self.fit(conversation, settings)
        keep = self.cache.reusable_prefix(prompt)
        self.cache.truncate(keep, prompt)
        stats.prompt_tokens, stats.cached_tokens = len(prompt.ids), keep
        new_images = [image for image, (start, _) in zip(prompt.images, prompt.image_spans) if start >= keep]
        budget = min(settings.max_new_tokens, self.context_window(settings) - len(prompt.ids))
        sampler = Sampler(settings, self.loaded.device)
        stream = TextStream(self.tokenizer)
        logits = self.run(prompt.ids[keep:], self.pixel_values(new_images))
        self.cache.image_digests = [image.digest for image in prompt.images]
        stats.ttft_s = time.perf_counter() - started
        stats.finish_reason = "length"
        for step in range(budget):
            token = sampler.pick(logits)
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                break
            stats.completion_tokens += 1
            chunk = stream.push(token)
            if chunk:
                yield chunk
            if step + 1 < budget:
                logits = self.run([token], None)
        if tail := stream.finish():
            yield tail
        conversation.answer(stream.text)
        stats.seconds = time.perf_counter() - started
        decode_seconds = stats.seconds - stats.ttft_s
        stats.tokens_per_s = (stats.completion_tokens - 1) / decode_seconds if stats.completion_tokens > 1 else 0.0
        stats.peak_memory_mb = self.peak_memory_mb()
        self.last_stats = stats

    def fit(self, conversation: Conversation, settings: Settings) -> tuple[Prompt, int]:
        """Encode the conversation, dropping its oldest turns until it fits the context window."""
        window = self.context_window(settings)
        answer_room = min(settings.max_new_tokens, window // 2)
        for dropped in range(len(conversation.turns)):
            prompt = self.encode(conversation.without_oldest(dropped))
            if len(prompt.ids) + answer_room <= window:
                break
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
        """Render and tokenize once, expanding each image placeholder to its image tokens."""
        text = self.loaded.prompt_format.render(conversation)
        images = conversation.images
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise InputError(f"the text {IMAGE_PLACEHOLDER} cannot be used in a message; it is reserved for images")
        counts = self.image_token_counts(images)
        expanded = pieces[0] + "".join(IMAGE_PLACEHOLDER * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = self.tokenizer(expanded)["input_ids"]
        return Prompt(ids=ids, images=images, image_spans=self.image_spans(ids, counts))

    def image_token_counts(self, images: list[ImageRef]) -> list[int]:
        if not images:
            return []
        sizes = [(image.image.height, image.image.width) for image in images]
        return list(self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)

    def image_spans(self, ids: list[int], counts: list[int]) -> list[tuple[int, int]]:
        image_id = self.model.config.image_token_id
        positions = [i for i, token in enumerate(ids) if token == image_id]
        spans, offset = [], 0
        for count in counts:
            spans.append((positions[offset], positions[offset + count - 1] + 1))
            offset += count
        return spans

    def pixel_values(self, images: list[ImageRef]) -> Any:
        """Preprocess each image once per engine (memoized by content) and stack the new ones."""
        if not images:
            return None
        import torch

        for image in images:
            if image.digest not in self.pixel_memo:
                processed = self.processor.image_processor(images=[image.image], return_tensors="pt")
                self.pixel_memo[image.digest] = processed["pixel_values"]
        stacked = torch.cat([self.pixel_memo[image.digest] for image in images])
        return stacked.to(self.model.device, self.model.dtype)

    def run(self, ids: list[int], pixel_values: Any) -> Any:
        """Run `ids` after what is cached and return the logits for the next token."""
        import torch
        from transformers import DynamicCache

        if self.cache.kv is None:
            self.cache.kv = DynamicCache(config=self.model.config.text_config)
        start = len(self.cache.ids)
        extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
        try:
            with torch.inference_mode():
                output = self.model(
                    input_ids=torch.tensor([ids], device=self.model.device),
                    position_ids=torch.arange(start, start + len(ids), device=self.model.device).unsqueeze(0),
                    cache=self.cache.kv,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                )
        except BaseException:
            self.cache.reset()  # an interrupted forward may have updated only some layers
            raise
        self.cache.ids.extend(ids)
        return output.logits[0, -1]

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
