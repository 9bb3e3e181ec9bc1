"""Format reward and the template readers: the R1 template's edge cases."""
import numpy as np
import pytest

from r1jax.rewards import (
    Tags,
    answer_text,
    final_answer,
    format_reward,
    make_format_reward,
    think_text,
)

GOOD = "<think>\n2 + 2 is 4.\n</think>\n<answer>\n4\n</answer>"


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<think>r</think><answer>4</answer>", 1.0),
    ("  \n" + GOOD + " \n\n", 1.0),                        # whitespace around: allowed
    ("Sure! " + GOOD, 0.0),                                # text before <think>
    (GOOD + " The answer is 4.", 0.0),                     # text after the answer
    (GOOD + "<|endoftext|>", 0.0),                         # undecoded special token
    ("<think>r</think> so <answer>4</answer>", 0.0),       # text between the blocks
    ("<think></think><answer>4</answer>", 0.0),            # empty think
    ("<think> \n </think><answer>4</answer>", 0.0),        # whitespace-only think
    ("<think>r</think><answer> </answer>", 0.0),           # empty answer
    ("<think>r</think>", 0.0),                             # missing answer
    ("<answer>4</answer>", 0.0),                           # missing think
    ("r</think><answer>4</answer>", 0.0),                  # missing opening think tag
    ("<think>r<answer>4</answer>", 0.0),                   # missing closing think tag
    ("<think>r</think><answer>4", 0.0),                    # unclosed answer
    ("<answer>4</answer><think>r</think>", 0.0),           # wrong order
    ("<think>a<think>b</think>c</think><answer>4</answer>", 0.0),   # nested think
    ("<think>r</think><answer>4<answer>5</answer></answer>", 0.0),  # nested answer
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0),  # two answers
    ("<think>r</think><think>s</think><answer>4</answer>", 0.0),    # two thinks
    ("<think>r <answer>4</answer></think><answer>4</answer>", 0.0),  # answer inside think
    ("<THINK>r</THINK><ANSWER>4</ANSWER>", 0.0),           # tags are case-sensitive
    ("", 0.0),
])
def test_format_edge_cases(completion, expected):
    assert format_reward([completion], [{}])[0] == expected


def test_format_batch_dtype_and_shape():
    out = format_reward([GOOD, "nope", GOOD], [{}] * 3)
    assert out.dtype == np.float32 and out.tolist() == [1.0, 0.0, 1.0]


def test_format_custom_tags_and_prefilled_think():
    fmt = make_format_reward(Tags(think=("<reasoning>", "</reasoning>"),
                                  answer=("<final>", "</final>")))
    assert fmt(["<reasoning>r</reasoning><final>4</final>", GOOD], [{}, {}]).tolist() == [1, 0]
    prefilled = make_format_reward(think_prefilled=True)
    # The chat template ends the prompt with "<think>\n": the completion must not reopen it.
    assert prefilled(["r</think><answer>4</answer>", GOOD, "</think><answer>4</answer>"],
                     [{}] * 3).tolist() == [1, 0, 0]
    for bad in [dict(think=("<t>", "<t>")), dict(answer=("", "</a>")),
                dict(think=("<a>", "</a>"), answer=("<a>", "</b>"))]:
        with pytest.raises(ValueError):
            Tags(**bad)


def test_readers_are_lenient():
    assert think_text(GOOD).strip() == "2 + 2 is 4."
    assert think_text("prefilled reasoning</think><answer>1</answer>") == "prefilled reasoning"
    assert think_text("<think>no end") is None
    assert answer_text("<think>r</think><answer>1</answer> junk <answer>2</answer>") == "2"
    assert answer_text("<think>r</think>2") is None
    assert final_answer("<answer>so \\boxed{\\frac{1}{2}} or \\boxed{3}</answer>") == "3"
    assert final_answer("<answer>\\boxed{\\sqrt{\\frac{a}{b}}}</answer>") == "\\sqrt{\\frac{a}{b}}"
    assert final_answer("<answer>\\boxed 5</answer>") == "5"
    assert final_answer("<answer> 42 </answer>") == "42"
