"""An answer-checking environment: the model answers, is told when it is wrong, and tries again.

The built-in `tools` config (`grpo-ray train --config tools`) trains SmolLM2-135M-Instruct on the
demo's sums with it. It uses TRL's environment contract (`reset(**row)`, `get_reward()`) plus
grpo-ray's `step(text)`: the model needs no tool-calling skill to take part, which a 135M model
does not have, and the reward says both whether and how soon it got the sum right.
"""

from __future__ import annotations

from grpo_ray.rewards import answers_match, extract_answer

RETRY = "Wrong. Answer again: only the number, in \\boxed{}."


class AnswerChecker:
    """One episode of one problem; the row's `answer` column is the gold answer."""

    def reset(self, answer: str | None = None, **row: object) -> None:
        self.answer = None if answer is None else str(answer)
        self.attempts = 0
        self.solved_at: int | None = None

    def step(self, text: str) -> str | None:
        """None ends the episode (right, or nothing to check against); else the next user turn."""
        self.attempts += 1
        if self.answer is None or answers_match(extract_answer(text), self.answer):
            self.solved_at = self.attempts if self.answer is not None else None
            return None
        return RETRY

    def get_reward(self) -> float:
        """1 for a right first answer, 1/2 for the second, 1/k for the k-th; 0 if never right."""
        return 0.0 if self.solved_at is None else 1.0 / self.solved_at
