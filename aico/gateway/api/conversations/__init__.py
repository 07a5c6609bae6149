"""The conversations domain: user messages to the conversation module, streamed or not."""
