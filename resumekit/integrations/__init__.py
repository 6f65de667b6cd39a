"""Adapters that let serving engines load resumekit: :mod:`.vllm` (an EC connector)."""
