"""A private LLM service. Three packages show the architecture: ``engine`` (models, batching, sampling,
constraints: the only code that touches llama.cpp), ``conversation`` (the chat service and its store) and
``web`` (server, routes, authentication, limits, observability). Beside them: ``settings`` (one table of
every setting), ``errors`` (one error hierarchy), ``personalities`` and ``models`` (validated configuration),
``schema_support`` and ``safe_regex`` (JSON Schema checking shared by the web layer and the engine)."""
