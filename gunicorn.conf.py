"""gunicorn settings for production (`make serve`, the Docker image).

One worker process, because the model lives in that process and must not be loaded twice; many threads,
because every websocket and streaming answer holds one while the scheduler batches them. Graceful shutdown
gives running answers up to `graceful_timeout` seconds to finish.
"""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '5000')}"
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("LLM_HTTP_THREADS", "64"))
timeout = 0  # streaming answers and websockets are long-lived; the engine enforces LLM_REQUEST_TIMEOUT
graceful_timeout = int(os.environ.get("LLM_GRACEFUL_SECONDS", "30"))
keepalive = 5
accesslog = "-"
