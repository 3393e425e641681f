"""Knowledge bases: documents users upload (PDF, DOCX, HTML, Markdown, plain text), read into passages, indexed for
hybrid retrieval, and searched for the passages an answer should be grounded in.

``documents`` reads an upload into located passages (page, or heading path) and refuses what it should not read
(unknown types, oversized files, archive and PDF bombs, encrypted or malformed files); ``index`` keeps bases,
documents and passages in SQLite with a full-text index (FTS5, BM25 ranking) and a vector index (sqlite-vec)
side by side, and fuses both rankings; the web routes are in ``llm.web.api.knowledge``.
"""
