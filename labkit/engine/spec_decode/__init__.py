"""Speculative decoding inside the engine (as vLLM keeps spec_decode in its v1 engine): the Speculator and its
verification (`speculator`), the drafts (`proposers`), and the speculator an EngineConfig describes (`build`)."""
