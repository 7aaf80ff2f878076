"""Built-in tiny models for the smoke recipes, the tests and the benchmarks: a random-weight
Qwen3 student and teacher (tiny.py, also at Qwen3's real shapes), and a tiny teacher trained
in-process to write <think> traces (thinker.py). Real recipes never use them; the stages reach
them only through shared.models for model names starting with "tiny:"."""
