"""Runnable examples that ship with grpo-ray (the built-in `tools` config uses `answer_checker`)."""
