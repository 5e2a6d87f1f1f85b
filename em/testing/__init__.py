"""Test doubles that speak real protocols (usable from tests and from user smoke checks)."""

from em.testing.fake_openai import FakeOpenAIServer, default_responder

__all__ = ["FakeOpenAIServer", "default_responder"]
