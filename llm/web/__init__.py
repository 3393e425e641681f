"""The web layer: the asyncio ``server``, the Flask routes in ``api`` (the chat page, /gpt, /toil, the
websocket, /v1, history), and what guards and watches every request: ``auth``, ``limits``, ``guard``,
``observability`` with ``metrics``, and ``logs``."""
