"""`llava chat` through the real command line: piped (text and JSON lines) and at a pseudo-terminal.

Every answer is compared with plain transformers greedy `generate` on the whole rendered history.
"""

from __future__ import annotations

import json
import re

from helpers import Repl, render_llava15, run_llava, visible

MAX_NEW = 12


def answers_for(reference, script: list[tuple[str, list]]) -> list[str]:
    """Reference answers to a conversation [(text, image paths)], each turn seeing the whole history."""
    history, paths, answers = [], [], []
    for text, image_paths in script:
        paths += image_paths
        answer = reference.answer(render_llava15(history + [(text, len(image_paths), None)]), paths, MAX_NEW)
        history.append((text, len(image_paths), answer))
        answers.append(answer)
    return answers


def test_piped_three_turns_two_images_print_one_reference_answer_per_line(tiny_model, images, reference):
    red, green = images["red"], images["green"]
    stdin = f"/image {red}\nWhat is in this picture?\nDescribe the colours.\n/image {green} Compare the two.\n"
    result = run_llava("chat", "--model", tiny_model, "-n", MAX_NEW, stdin=stdin)
    expected = answers_for(
        reference, [("What is in this picture?", [red]), ("Describe the colours.", []), ("Compare the two.", [green])]
    )
    assert result.returncode == 0, result.stderr_text
    assert result.stderr_text == ""
    assert result.stdout == "".join(answer + "\n" for answer in expected).encode()


def test_piped_json_lines_with_a_bad_image_and_clear(tiny_model, images, reference, tmp_path):
    red, green, missing = images["red"], images["green"], tmp_path / "missing.png"
    lines = [
        "What is in this picture?",  # with --image red
        "Describe the colours.",
        f"/image {green} Compare the two.",
        f"/image {green} {missing}",  # fails as a whole: neither image is attached
        "Which one is brighter?",
        "/clear",
        "Start again.",
    ]
    result = run_llava(
        "chat", "--image", red, "--json", "--model", tiny_model, "-n", MAX_NEW, stdin="\n".join(lines) + "\n"
    )
    script = [
        ("What is in this picture?", [red]),
        ("Describe the colours.", []),
        ("Compare the two.", [green]),
        ("Which one is brighter?", []),
    ]
    expected = answers_for(reference, script) + answers_for(reference, [("Start again.", [])])

    assert result.returncode == 1  # a message failed along the way
    assert result.stderr_text == f"llava: error: image not found: {missing}\n"
    records = [json.loads(line) for line in result.stdout_text.splitlines()]
    assert [record["answer"] for record in records] == expected
    assert all(0 < record["completion_tokens"] <= MAX_NEW for record in records)


# --- the interactive REPL, through a pseudo-terminal ---------------------------------------------


def test_repl_image_question_ctrl_c_clear_quit(tiny_model, images, reference, tmp_path):
    red = images["red"]
    repl = Repl(tiny_model, MAX_NEW, tmp_path)
    repl.command(f"/image {red}", "attached")
    shown = repl.ask("What is in this picture?")
    assert shown == visible(answers_for(reference, [("What is in this picture?", [red])])[0])

    repl.child.sendintr()  # Ctrl-C at the prompt clears the line; the REPL stays
    repl.prompt()
    repl.command("/clear", "conversation cleared")
    # Forgotten: the answer is the one to this question alone, without the image.
    assert repl.ask("Start again.") == visible(answers_for(reference, [("Start again.", [])])[0])
    repl.child.sendline("/quit")
    assert repl.exit_status() == 0
    assert "Traceback" not in repl.screen()


def colour_codes(raw: str) -> set[str]:
    """The SGR parameters that set a colour (30-49, 90-107) in `raw`."""
    found = set()
    for parameters in re.findall(r"\x1b\[([0-9;]*)m", raw):
        found |= {p for p in parameters.split(";") if p.isdigit() and (30 <= int(p) <= 49 or 90 <= int(p) <= 107)}
    return found


DECODING = "<decoding>"  # what the hook writes to stderr once the answer is under way
SLOW_DECODE_HOOK = f"""
import itertools
import os
import time
import llava_cli.engine.scheduler as scheduler

_forward = scheduler.forward
_forwards = itertools.count()


def slow_forward(*args, **kwargs):
    time.sleep(0.05)  # every forward, one a token on every path: 900 tokens take 45 s, so Ctrl-C surely lands mid-answer
    if next(_forwards) == 3:  # the prompt's and two tokens': into the answer
        os.write(2, b"{DECODING}")
    return _forward(*args, **kwargs)


scheduler.forward = slow_forward
"""


def test_repl_bad_image_ctrl_c_mid_answer_ctrl_d_and_no_colour(tiny_model, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_DECODE_HOOK)
    repl = Repl(tiny_model, 900, tmp_path, NO_COLOR="1", PYTHONPATH=str(hooks))
    repl.command(f"/image {tmp_path / 'missing.png'}", f"error: image not found: {tmp_path / 'missing.png'}")
    repl.child.sendline("tell me a long story")
    repl.child.expect_exact("story")
    repl.child.expect_exact(DECODING)  # into the answer, which the hook makes last 45 s
    repl.child.sendintr()
    repl.child.expect_exact("answer stopped")
    repl.prompt()
    repl.child.sendcontrol("d")
    assert repl.exit_status() == 0  # the failed /image was shown and the chat went on: not a failure
    raw = repl.log.getvalue().decode("utf-8", errors="replace")
    assert "Traceback" not in raw
    assert colour_codes(raw) == set()
