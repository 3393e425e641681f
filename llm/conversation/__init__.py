"""Conversations: the chat ``service`` that turns prompts into engine requests (personalities, RAG, history
within the token budget, tools), the ``turns`` of a conversation, and the ``store`` that keeps them (SQLite or
PostgreSQL; edits and regenerations as a tree of messages)."""
