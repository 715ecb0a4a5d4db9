"""The parts of bench/gpu.py: the random llava-1.5-7b-shaped model, the clock, and one function per
phase. A phase takes the `Bench` (model, settings, what earlier phases found) and returns its
figures as a flat dict of numbers (and a few booleans); bench/gpu.py runs, reports and saves them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from typing import Any

# Data-sheet memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name().
DATASHEET_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,  # SXM
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "RTX 4090": 1.008e12,
}
VOCAB = 32064
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
WORDS = [
    "USER:",
    "ASSISTANT:",
    "What",
    "is",
    "in",
    "this",
    "picture?",
    "Describe",
    "it",
    "in",
    "detail.",
    "Tell",
    "me",
    "more",
    "about",
    "the",
    "colours",
    "and",
    "shapes",
    ".",
]
QUESTIONS = [f"Question {n}: what else can you tell me about it?" for n in range(1, 100)]


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    mlp: int = 11008
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096


SMOKE = Shape(hidden=128, layers=2, heads=2, mlp=256, vision_hidden=64, vision_layers=2, vision_heads=1, vision_mlp=128)


def build_tokenizer():
    """A word-level tokenizer with llava-1.5's vocabulary size and special-token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = list(dict.fromkeys(["<unk>", "<s>", "</s>"] + WORDS))
    names += [f"w{i}" for i in range(len(names), IMAGE_TOKEN)] + ["<image>", "<pad>"]
    names += [f"x{i}" for i in range(len(names), VOCAB)]
    vocab = {name: index for index, name in enumerate(names)}
    assert len(vocab) == VOCAB and vocab["<image>"] == IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_loaded(shape: Shape, device: str, dtype, attention: str = "sdpa"):
    """llava-cli's `LoadedModel` around a random llava-1.5-7b-shaped model made directly on `device`,
    with the attention implementation `attention` (bench/gpu.py passes what `--attn auto` picks)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llava_cli.base.families import family_for
    from llava_cli.models.loader import LoadedModel
    from llava_cli.prompt.conversation import Llava15Format

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with torch.device(device):  # weights are created on the GPU: no CPU copy, no float32 detour
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attention).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LoadedModel(
        name="random llava-1.5-7b-shaped",
        model=model,
        processor=processor,
        prompt_format=Llava15Format(),
        family=family_for({"model_type": "llava"}),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
    )


def picture():
    """A 640x480 picture (the processor resizes and crops it to 336x336)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (30, 120, 200))
    ImageDraw.Draw(image).ellipse((120, 80, 480, 400), fill=(250, 250, 250))
    return image


def image_ref(image):
    """An `ImageRef` for an in-memory picture, through llava-cli's own loader (PNG bytes)."""
    from llava_cli.media.images import image_from_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image_from_bytes(buffer.getvalue(), "picture.png", 50_000_000)


class Clock:
    """Wall-clock seconds of a call, with the GPU's queued work finished at both ends."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, action) -> float:
        self.sync()
        started = time.perf_counter()
        action()
        self.sync()
        return time.perf_counter() - started


def copy_bandwidth(device: str, floats: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical bandwidth ceiling."""
    import torch

    source = torch.empty(floats, dtype=torch.float32, device=device)  # 2 GiB on a GPU
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = Clock(device)(lambda: [target.copy_(source) for _ in range(10)])
    return 2 * source.numel() * source.element_size() * 10 / seconds


def decode_bytes_per_token(model) -> int:
    """Bytes of weights each decoded token reads: the decoder and lm_head, not the vision tower nor
    the embedding table (one row of it per token)."""
    decoder = sum(
        p.numel() * p.element_size()
        for name, p in model.model.language_model.named_parameters()
        if "embed_tokens" not in name
    )
    return decoder + sum(p.numel() * p.element_size() for p in model.lm_head.parameters())


def peak_gb(device: str) -> float:
    """Peak GPU memory allocated; on a CPU (smoke runs) the process's peak resident memory."""
    import resource

    import torch

    return (
        torch.cuda.max_memory_allocated() / 1e9
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    )


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def fixed_length(engine):
    """No end-of-sequence for the benchmark: every answer is exactly max_new_tokens long, so tokens/s
    compare like with like (random weights would stop at a random point)."""
    engine.eos_ids = set()
    return engine


PROMPT = "What is in this picture? Describe it in detail."
FOUR_BIT_BITS_PER_PARAM = 4.5  # bitsandbytes nf4: 4 bits plus a 16-bit scale per 64-weight block, rounded up
# Where torch's recompiles and graph_breaks log records end up: set_logs stops them there (propagate off).
DYNAMO_LOGGER = "torch._dynamo"
BUCKET_STEPS = (1025, 2049)  # tokens that need the 2048- and 4096-column buckets
FAIL_ON_PURPOSE = "failing on purpose (--fail-phase, the benchmark's self-test)"


# llava-cli's decode step as `ask` and `chat` run it (a batch of one on the scheduler), by the name of
# its figures: the default (whole row and column buckets, replayed as a CUDA graph), --no-cuda-graph
# (exact shapes, uncaptured: what a CPU runs) and --compile (the bucketed step through torch.compile).
PATHS = ("default", "no_cuda_graph", "compile")


@dataclasses.dataclass
class Bench:
    """What every phase needs: the model, the settings of each path, and the figures found so far."""

    loaded: Any
    image: Any  # the PIL picture, for plain `generate`
    ref: Any  # the same picture as llava-cli's `ImageRef`
    paths: dict[str, Any]  # the settings of each of PATHS (the attention each runs is `settings.attn`)
    tokens: int
    turns: int
    repeats: int  # of each time-to-first-token measurement (the best one counts)
    batch: int  # images in the batch phase (16 on a GPU)
    found: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    engines: dict[str, Any] = dataclasses.field(default_factory=dict)

    def engine(self, path: str):
        """The one fixed-length engine of each path (one --compile engine: one compile; one default
        engine: its slots and graphs kept from phase to phase)."""
        from llava_cli.engine.kvbudget import CHAT
        from llava_cli.engine.local import Engine
        from llava_cli.engine.scheduler import DecodeBatch

        if path not in self.engines:
            engine = self.engines[path] = fixed_length(Engine(self.loaded))
            if path == "default" and self.device == "cpu":
                # A smoke run on the CPU still steps the GPU's bucketed shapes (a CPU's own default: exact ones).
                engine.batch = DecodeBatch(engine, engine.history, holder=CHAT, captured_shapes=True)
        return self.engines[path]

    @property
    def device(self) -> str:
        return self.loaded.device

    def clock(self, action) -> float:
        return Clock(self.device)(action)


def card_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"


def bandwidth_phase(bench: Bench) -> dict[str, Any]:
    """The bandwidth bound: bytes of weights read per token over the measured copy bandwidth and,
    where the card is known, its data-sheet bandwidth."""
    card = card_name(bench.device)
    sheet = next((value for key, value in DATASHEET_BANDWIDTH.items() if key in card), None)
    per_token = decode_bytes_per_token(bench.loaded.model)
    copy = copy_bandwidth(bench.device, 2**29 if bench.device == "cuda" else 2**22)
    figures = {"bytes_per_token": per_token, "copy_gb_s": copy / 1e9, "copy_bound_tok_s": copy / per_token}
    if sheet:
        figures |= {"datasheet_gb_s": sheet / 1e9, "datasheet_bound_tok_s": sheet / per_token}
    return figures


def plain_phase(bench: Bench) -> dict[str, Any]:
    """Plain `model.generate` on the same prompt: decode tokens/s between the first and the last
    token (stamped as generate picks each one, GPU synced), fixed-length answers; time to first token."""
    import torch
    from transformers import LogitsProcessorList

    loaded = bench.loaded
    prompt = f"USER: <image>\n{PROMPT} ASSISTANT:"
    inputs = loaded.processor(text=prompt, images=bench.image, return_tensors="pt").to(loaded.model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)

    def run(n: int, stamps: list[float]) -> None:
        with torch.inference_mode():
            loaded.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                logits_processor=LogitsProcessorList([TokenStamps(bench.device, stamps)]),
            )

    run(2, [])  # warm-up
    reset_peak(bench.device)
    first = min(bench.clock(lambda: run(1, [])) for _ in range(bench.repeats))
    stamps: list[float] = []
    run(bench.tokens, stamps)
    return {
        "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "ttft_s": first,
        "peak_gb": peak_gb(bench.device),
    }


class TokenStamps:
    """A logits processor that only notes when `generate` picks each token (the GPU's work done)."""

    def __init__(self, device: str, stamps: list[float]) -> None:
        self.clock = Clock(device)
        self.stamps = stamps

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.clock.sync()
        self.stamps.append(time.perf_counter())
        return scores


def engine_phase(bench: Bench, path: str) -> dict[str, Any]:
    """llava-cli's engine on a fresh one-image conversation, on one of PATHS, with the attention that
    path runs: decode tokens/s from the answer's `Done` figures, time to first token for the 576-token
    image prompt (GPU synced before the clock), peak memory, and whether a CUDA graph was replayed."""
    settings = bench.paths[path]
    engine = bench.engine(path)
    with attention_for(bench.loaded.model, settings):
        started = time.perf_counter()
        answer_image(engine, bench, settings)  # warm-up (compiling, capturing the graphs)
        warmup = time.perf_counter() - started
        reset_peak(bench.device)
        stats = answer_image(engine, bench, settings)
        one_token = dataclasses.replace(settings, max_new_tokens=1)
        ttft = min(bench.clock(lambda: answer_image(engine, bench, one_token)) for _ in range(bench.repeats))
    notes = engine.batch.take_notes()
    for note in notes:
        print(f"{path}: note: {note}", flush=True)
    return {
        "tokens_per_s": stats.tokens_per_s,
        "ttft_s": ttft,
        "prompt_tokens": stats.prompt_tokens,
        "warmup_s": warmup,
        "peak_gb": stats.peak_memory_mb * 2**20 / 1e9,
        "graph_replayed": graph_replayed(engine),
    }


def graph_replayed(engine) -> bool:
    """Whether the engine's batch replayed a captured CUDA graph (only the default path on a GPU)."""
    return any(step.graph is not None for step in engine.batch.captured.values())


def answer_image(engine, bench: Bench, settings):
    """One answer to a fresh one-image conversation; its figures (the backend's `Done`)."""
    from llava_cli.engine.backend import Answer
    from llava_cli.prompt.conversation import Conversation

    engine.reset()  # a fresh conversation every run: the image and prompt run again
    conversation = Conversation()
    conversation.ask(PROMPT, [bench.ref])
    answer = Answer(engine.generate(conversation, settings))
    "".join(answer)
    return answer.stats


def default_phase(bench: Bench) -> dict[str, Any]:
    return engine_phase(bench, "default")


def no_cuda_graph_phase(bench: Bench) -> dict[str, Any]:
    return engine_phase(bench, "no_cuda_graph")


@contextlib.contextmanager
def attention_for(model, settings):
    """The model runs with `settings.attn` inside the block (SDPA for --compile, as llava-cli loads
    it then), and with the attention it was loaded with (`--attn auto`'s choice) again after it."""
    loaded_with = model.config._attn_implementation
    model.set_attn_implementation(settings.attn)
    try:
        yield
    finally:
        model.set_attn_implementation(loaded_with)


def compile_phase(bench: Bench) -> dict[str, Any]:
    """--compile, with dynamo's own counts of graphs, graph breaks and recompiles (TORCH_LOGS=
    recompiles,graph_breaks is switched on, so each one is also logged on stderr)."""
    with DynamoEvidence() as evidence:
        figures = engine_phase(bench, "compile")
    return figures | evidence.figures


class DynamoEvidence:
    """Counts what torch.compile did inside the block: graphs compiled, graph breaks, recompiles,
    and compiled graphs that skipped CUDA-graph capture."""

    def __enter__(self) -> DynamoEvidence:
        import torch

        torch._dynamo.utils.counters.clear()
        torch._logging.set_logs(recompiles=True, graph_breaks=True)
        self.logged = {"recompiles": 0, "graph_breaks": 0}
        self.handler = _CountingHandler(self.logged)
        logging.getLogger(DYNAMO_LOGGER).addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        logging.getLogger(DYNAMO_LOGGER).removeHandler(self.handler)
        counters = torch._dynamo.utils.counters
        self.figures = {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],  # > 0: CUDA graphs did not engage
            "recompiles": self.logged["recompiles"],
            "graph_break_logs": self.logged["graph_breaks"],
        }


class _CountingHandler(logging.Handler):
    """Counts the records of torch's `recompiles` and `graph_breaks` log artifacts."""

    def __init__(self, logged: dict[str, int]) -> None:
        super().__init__()
        self.logged = logged

    def emit(self, record: logging.LogRecord) -> None:
        for artifact in self.logged:
            if record.name.endswith(f"__{artifact}"):
                self.logged[artifact] += 1


def crop_chat_phase(bench: Bench) -> dict[str, Any]:
    """A chat on each path where every turn crops the cache: before each new question the previous
    answer is shortened (as an edited history would be), so the prompt diverges inside cached tokens
    and only the common prefix of the chat's history is reused. Each answer must equal plain greedy
    `generate` on its prompt."""
    figures: dict[str, Any] = {}
    for path in PATHS:
        settings = bench.paths[path]
        engine = bench.engine(path)
        engine.eos_ids = engine.end_of_sequence_ids()  # answers end where plain `generate`'s do
        chat = dataclasses.replace(settings, max_new_tokens=min(bench.tokens, 16))
        try:
            with attention_for(bench.loaded.model, settings), DynamoEvidence() as evidence:
                crops, equal = crop_chat(engine, bench, chat)
        finally:
            fixed_length(engine)
        figures |= {
            f"{path}_crops": crops,
            f"{path}_turns_equal": equal,
            f"{path}_answers_equal": equal == bench.turns,
            f"{path}_recompiles": evidence.figures["recompiles"],
        }
    return figures


def crop_chat(engine, bench: Bench, settings) -> tuple[int, int]:
    """Turns whose cache was cropped, and turns whose answer equals plain greedy `generate`'s."""
    from llava_cli.engine.backend import Answer
    from llava_cli.prompt.conversation import Conversation

    engine.reset()
    conversation, crops, equal = Conversation(), 0, 0
    for turn in range(bench.turns):
        if turn:
            previous = conversation.turns[-1]
            previous.answer = " ".join((previous.answer or "").split()[: max(1, settings.max_new_tokens // 2)])
        cached = sum(len(held.entry.ids) for held in engine.history.entries.values())
        conversation.ask(QUESTIONS[turn], [bench.ref] if turn == 0 else [])
        reference = plain_greedy(engine, conversation, settings.max_new_tokens)
        answer = Answer(engine.generate(conversation, settings))
        text = "".join(answer)
        answer.record_in(conversation)
        crops += answer.stats.cached_tokens < cached
        equal += text.strip() == reference
    return crops, equal


def plain_greedy(engine, conversation, tokens: int) -> str:
    """Plain transformers: `generate` (greedy, no cache reuse) on the prompt llava-cli builds."""
    import torch

    prompt = engine.encode(conversation)
    ids = torch.tensor([prompt.ids], device=engine.model.device)
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=ids, **engine.image_inputs(prompt, 0), do_sample=False, max_new_tokens=tokens
        )
    return engine.tokenizer.decode(output[0, len(prompt.ids) :], skip_special_tokens=True).strip()


def memory_phase(bench: Bench) -> dict[str, Any]:
    """Peak memory fp16 of the default path (the mark's figure) and of all paths, and an analytic 4-bit
    estimate, since bitsandbytes is not on the GPU machine: every linear layer but lm_head (what
    `--load-4bit` quantizes) at 4.5 bits/param, the rest as loaded, plus the column bucket of the batch
    cache the default phase ran in and the activations it needed beyond its weights and cache."""
    from llava_cli.engine.scheduler import columns_bucket

    model = bench.loaded.model
    default = bench.found.get("default")
    if default is None:
        raise RuntimeError("the memory figures need the default phase's, and that phase failed")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    linears = [m.weight for name, m in model.named_modules() if type(m).__name__ == "Linear" and name != "lm_head"]
    linear_bytes = sum(w.numel() * w.element_size() for w in linears)
    four_bit_weights = weights - linear_bytes + sum(w.numel() for w in linears) * FOUR_BIT_BITS_PER_PARAM / 8
    kv_per_token = kv_bytes_per_token(model)
    window = bench.loaded.context_window or model.config.text_config.max_position_embeddings
    bucket = columns_bucket(default["prompt_tokens"] + bench.tokens)  # the batch cache's columns in the default phase
    activations = max(0.0, default["peak_gb"] * 1e9 - weights - kv_per_token * bucket)
    return {
        "peak_fp16_gb": default["peak_gb"],
        "peak_all_paths_gb": max(bench.found[name]["peak_gb"] for name in ("plain", *PATHS) if name in bench.found),
        "weights_fp16_gb": weights / 1e9,
        "weights_4bit_gb": four_bit_weights / 1e9,
        "bucket_tokens": bucket,
        "kv_bucket_gb": kv_per_token * bucket / 1e9,
        "kv_window_gb": kv_per_token * window / 1e9,
        "activations_gb": activations / 1e9,
        "estimate_4bit_gb": (four_bit_weights + kv_per_token * bucket + activations) / 1e9,
    }


def batch_phase(bench: Bench) -> dict[str, Any]:
    """Decode tokens/s of the scheduler that `llava serve` and `ask --each` run (engine/scheduler.py) at
    batch 1, 8 and `bench.batch` rows (32 on a GPU; 1 and 4 in a smoke run), with its step replayed as
    a CUDA graph per (rows, columns) bucket (`graph`) and uncaptured (`no_graph`, --no-cuda-graph):
    that many copies of the one-image prompt admitted at once into one long-lived batch (as serve
    keeps one: its graphs are captured in the warm-up), fixed-length answers; the clock spans their
    prefills too. Each is also given as a ratio to the batch-of-one default path with and without its
    CUDA graph (the `default` and `no_cuda_graph` phases), when those ran. `graph_replayed`: whether
    the scheduler replayed a graph (on a CPU the captured shapes run eagerly: a smoke run goes
    through the same code)."""
    from llava_cli.engine.prefixpool import PrefixPool
    from llava_cli.engine.scheduler import DecodeBatch
    from llava_cli.prompt.conversation import Conversation

    engine = bench.engine("default")
    conversation = Conversation()
    conversation.ask(PROMPT, [bench.ref])
    prompt = engine.encode(conversation)
    figures: dict[str, Any] = {}
    replayed = False
    for graph, name in ((True, "graph"), (False, "no_graph")):
        batch = DecodeBatch(engine, PrefixPool(None), captured_shapes=True)
        settings = dataclasses.replace(bench.paths["default"], no_cuda_graph=not graph)

        def answer(rows: int, batch: DecodeBatch = batch, settings: Any = settings) -> None:
            for _ in range(rows):
                batch.admit(prompt, settings, bench.tokens)
            while len(batch):
                batch.step()

        sizes = sorted({1, min(8, bench.batch), bench.batch})
        for rows in sizes:
            answer(rows)  # warm-up: on a GPU, the captures of each bucket this size goes through
        for rows in sizes:
            rate = rows * bench.tokens / bench.clock(lambda rows=rows: answer(rows))
            figures[f"b{rows}_{name}_tokens_per_s"] = rate
            for path in ("default", "no_cuda_graph"):
                if "tokens_per_s" in bench.found.get(path, {}):
                    figures[f"b{rows}_{name}_vs_{path}_b1"] = rate / bench.found[path]["tokens_per_s"]
        replayed = replayed or any(step.graph is not None for step in batch.captured.values())
        if graph:
            figures["capture_failed"] = batch.capture_failure is not None
            for note in batch.take_notes():
                print(f"  batch: {note}", flush=True)
    figures["graph_replayed"] = replayed
    return figures


def buckets_phase(bench: Bench) -> dict[str, Any]:
    """Peak memory of the default path in each column bucket of its batch cache (the slots of a batch
    of one): the slots are made that wide first (as a conversation that long would), then one short
    image answer runs in them. Also the bucket's own size (2 x layers x KV heads x head size x bytes,
    per token)."""
    from llava_cli.engine.scheduler import columns_bucket

    settings = dataclasses.replace(bench.paths["default"], max_new_tokens=min(bench.tokens, 16))
    for path, other in bench.engines.items():
        if path != "default":
            other.free_memory()  # the other paths' slots out of the peaks
    engine = bench.engine("default")
    figures: dict[str, Any] = {}
    with attention_for(bench.loaded.model, settings):
        first = answer_image(engine, bench, settings)  # the slots exist, in the smallest bucket the answer needs
        window = engine.context_window(settings)
        needed = first.prompt_tokens + settings.max_new_tokens + 1
        for size in sorted({columns_bucket(n) for n in (needed, *BUCKET_STEPS) if n <= window}):
            slots = engine.batch.live_slots
            engine.batch.slots, engine.batch.captured = slots.grown(1, size, 0, 0), {}
            del slots
            stats = answer_image(engine, bench, settings)
            if engine.batch.live_slots.capacity_columns != size:
                ran = engine.batch.live_slots.capacity_columns
                raise RuntimeError(f"the answer ran in a {ran}-column bucket, not the {size}-column one")
            figures |= {
                f"peak_gb_{size}": stats.peak_memory_mb * 2**20 / 1e9,
                f"kv_gb_{size}": kv_bytes_per_token(bench.loaded.model) * size / 1e9,
            }
    return figures


def kv_bytes_per_token(model) -> int:
    text = model.config.text_config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head * next(model.parameters()).element_size()


PHASES = {
    "bandwidth": bandwidth_phase,
    "plain": plain_phase,
    "default": default_phase,
    "no_cuda_graph": no_cuda_graph_phase,
    "compile": compile_phase,
    "crop_chat": crop_chat_phase,
    "buckets": buckets_phase,
    "memory": memory_phase,
    "batch": batch_phase,
}
