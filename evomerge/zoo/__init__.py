"""A local model zoo: a small Llama base and single-skill experts fine-tuned from it, with
lm-eval tasks for each skill and for a cross-skill target. Nothing is downloaded."""
