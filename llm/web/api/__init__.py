"""HTTP and websocket routes; thin: parse, call the chat service, format."""

from flask import current_app


def services():
    """The app's long-lived objects (``app.Services``): settings, engine, chat service, stores."""
    return current_app.extensions["llm"]
