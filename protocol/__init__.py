"""The wire: message structs, codec (framing + version), error codes, and the client library."""
