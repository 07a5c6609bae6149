"""The request router: one protocol-agnostic route table shared by every adapter."""
