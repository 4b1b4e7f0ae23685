"""The OpenAI-compatible HTTP gateway: the thinnest correct HTTP front over protocol.client."""
