"""HTTP and websocket routes; thin: parse, call the chat service, format."""
