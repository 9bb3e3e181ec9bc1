"""Rewards: strings in, floats out. Each reward is `fn(completions, examples) -> scores_B`.

`completions` are decoded completion texts, `examples` the dataset rows they answer (dicts
with "prompt" and "answer", optionally "task", "tests", "language"), `scores_B` a float32
array with one score per completion. This package imports no jax: it runs in worker
processes, and model output runs only in sandboxed subprocesses.
"""

from r1jax.rewards.accuracy import accuracy_reward, make_accuracy_reward, task_of
from r1jax.rewards.code import (
                                SandboxResult,
                                code_reward,
                                extract_program,
                                make_code_reward,
                                run_sandboxed,
)
from r1jax.rewards.compose import Reward, RewardOutput, RewardSet, combine, routed_mean
from r1jax.rewards.format import format_reward, make_format_reward
from r1jax.rewards.language import (
                                language_consistency_reward,
                                language_word_counts,
                                make_language_consistency_reward,
)
from r1jax.rewards.math import gsm8k_gold, make_math_reward, math_reward, verify_answer
from r1jax.rewards.model_based import (
                                Scorer,
                                final_response,
                                harmlessness_reward,
                                helpfulness_reward,
                                make_model_reward,
)
from r1jax.rewards.pool import WorkerPool
from r1jax.rewards.tasks import (
                                arith_reward,
                                countdown_reward,
                                make_arith_reward,
                                make_countdown_reward,
                                parse_integer,
                                safe_arith_eval,
)
from r1jax.rewards.template import R1_TAGS, Tags, answer_text, final_answer, think_text

__all__ = [
    "accuracy_reward", "make_accuracy_reward", "task_of",
    "code_reward", "make_code_reward", "run_sandboxed", "SandboxResult", "extract_program",
    "Reward", "RewardOutput", "RewardSet", "combine", "routed_mean",
    "format_reward", "make_format_reward",
    "language_consistency_reward", "make_language_consistency_reward", "language_word_counts",
    "math_reward", "make_math_reward", "verify_answer", "gsm8k_gold",
    "Scorer", "make_model_reward", "helpfulness_reward", "harmlessness_reward",
    "final_response",
    "WorkerPool",
    "arith_reward", "countdown_reward", "make_arith_reward", "make_countdown_reward",
    "parse_integer", "safe_arith_eval",
    "Tags", "R1_TAGS", "answer_text", "think_text", "final_answer",
]
