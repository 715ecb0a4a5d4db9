"""`PrefixCache`: which leading tokens of a new prompt the KV cache may serve, with mock images and KV."""

from __future__ import annotations

from types import SimpleNamespace

from llava_cli.engine.runner import PrefixCache, Prompt, image_keys

IMAGE = 99  # the image token id


def image(digest: str) -> SimpleNamespace:
    return SimpleNamespace(digest=digest)


def prompt(ids: list[int], *digests: str) -> Prompt:
    """`ids` with each run of IMAGE tokens taken, in order, by an image of the given digests."""
    spans, start = [], None
    for index, token in enumerate(ids + [None]):
        if token == IMAGE and start is None:
            start = index
        elif token != IMAGE and start is not None:
            spans.append((start, index))
            start = None
    assert len(spans) == len(digests)
    return Prompt(ids=ids, images=[image(d) for d in digests], image_spans=spans)


def cache_of(cached: Prompt) -> PrefixCache:
    return PrefixCache(kv=None, ids=list(cached.ids), images=image_keys(cached))


FIRST = prompt([1, 2, IMAGE, IMAGE, IMAGE, 3, 4, 5], "red")


def test_an_identical_prompt_reuses_all_but_its_last_token():
    assert cache_of(FIRST).reusable_prefix(FIRST) == len(FIRST.ids) - 1


def test_a_prompt_that_goes_on_reuses_everything_cached():
    longer = prompt(FIRST.ids + [6, 7], "red")
    assert cache_of(FIRST).reusable_prefix(longer) == len(FIRST.ids)


def test_text_that_differs_after_the_image_keeps_the_image():
    edited = prompt([1, 2, IMAGE, IMAGE, IMAGE, 3, 8, 9], "red")
    assert cache_of(FIRST).reusable_prefix(edited) == 6


def test_a_changed_image_in_the_same_place_is_run_again():
    other = prompt(FIRST.ids, "green")
    assert cache_of(FIRST).reusable_prefix(other) == 2  # the text before the image only


def test_the_prefix_never_ends_inside_an_image():
    new = prompt([1, 2, IMAGE, IMAGE, IMAGE, 7], "red")
    cache = PrefixCache(kv=None, ids=new.ids[:4], images=image_keys(new))  # a cache that stops mid-image
    assert cache.reusable_prefix(new) == 2


def test_the_same_image_taking_other_tokens_is_run_again():
    """OneVision encodes a picture with fewer tokens once a prompt holds several: content is not enough."""
    cache = cache_of(FIRST)
    cache.images = [("red", (2, 4))]
    assert cache.reusable_prefix(FIRST) == 2


def test_an_empty_cache_reuses_nothing():
    assert PrefixCache().reusable_prefix(FIRST) == 0
