"""Knowledge-base evaluation for docs/KNOWLEDGE.md: retrieval quality, grounded answers, indexing and query speed.

The corpus (``bench/knowledge_corpus``) is eight short documents about a fictional institute, written for this
evaluation (so no model has seen them), and 48 questions phrased differently from the text, each with its
known answer and the section that holds it. One document goes in as DOCX and one as HTML, so their readers are
measured too. Figures:

* recall@1 and recall@5 (the gold section first, or among the first five passages) and mean reciprocal rank,
  for BM25 alone, vectors alone and the hybrid fusion the service uses: on the corpus alone, then with about
  3,000 passages of distractors in the same base (the READMEs of the Python packages installed here: real
  text, much of it about accounts, passwords, files and limits);
* answer accuracy on the default model (the embedded SmolLM2-135M, greedy), with and without retrieval: the
  known answer appears in the answer text; with retrieval, the service adds the passages exactly as in
  production (``/gpt`` of a user who uploaded the documents, against a user who did not), and once more with the
  model deciding first whether and what to look up (``grounding = "model"``);
* indexing speed (pages per second, a generated 200-page PDF) and hybrid query latency (median and 95th
  percentile over the 48 questions) at 1,000 and 10,000 passages.

``make eval-knowledge`` runs it; ``--no-answers`` skips the model (a minute less).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docx
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._servers import our_server  # noqa: E402
from llm.engine.embeddings import Embeddings  # noqa: E402
from llm.knowledge.index import KnowledgeIndex  # noqa: E402
from llm.models import embedded_model_path  # noqa: E402
from llm.settings import load_settings  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "knowledge_corpus"
AS_DOCX, AS_HTML = "staff-handbook.md", "building-guide.md"
PERSONALITY = """\
name = "eval"
description = "Knowledge evaluation: greedy, short answers."
intro = "Eval."
system_prompt = "Answer the question in one short sentence. Use the context when there is one."

[sampling]
temperature = 0
top_p = 1
repeat_penalty = 1.0
max_tokens = 48
"""


def as_docx(markdown: str) -> bytes:
    document = docx.Document()
    for block in markdown.split("\n\n"):
        heading = re.match(r"(#+) (.*)", block)
        if heading:
            document.add_heading(heading[2], level=len(heading[1]))
        elif block.strip():
            document.add_paragraph(" ".join(block.split()))
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def as_html(markdown: str) -> bytes:
    parts = ["<!doctype html><html><body><nav>Home | Contact</nav><main>"]
    for block in markdown.split("\n\n"):
        heading = re.match(r"(#+) (.*)", block)
        parts.append(f"<h{len(heading[1])}>{heading[2]}</h{len(heading[1])}>" if heading
                     else f"<p>{' '.join(block.split())}</p>")
    return ("".join(parts) + "</main><footer>Harbourview</footer></body></html>").encode()


def documents() -> list[tuple[str, bytes]]:
    """The corpus as uploads: (file name, bytes)."""
    files = []
    for path in sorted(CORPUS.glob("*.md")):
        text = path.read_text()
        if path.name == AS_DOCX:
            files.append((path.with_suffix(".docx").name, as_docx(text)))
        elif path.name == AS_HTML:
            files.append((path.with_suffix(".html").name, as_html(text)))
        else:
            files.append((path.name, text.encode()))
    return files


def questions() -> list[dict]:
    return json.loads((CORPUS / "questions.json").read_text())


def is_gold(hit, question: dict) -> bool:
    return Path(hit.document).stem == Path(question["doc"]).stem and hit.location.endswith(question["at"])


def retrieval(library: KnowledgeIndex, base: int) -> dict[str, tuple[float, float, float]]:
    """recall@1, recall@5 and MRR (over the first five) per mode."""
    figures = {}
    for mode in ("bm25", "vector", "hybrid"):
        ranks = []
        for question in questions():
            hits = library.search([base], question["q"], 5, mode)
            ranks.append(next((rank for rank, hit in enumerate(hits, 1) if is_gold(hit, question)), None))
        figures[mode] = (sum(r == 1 for r in ranks) / len(ranks), sum(r is not None for r in ranks) / len(ranks),
                         sum(1 / r for r in ranks if r is not None) / len(ranks))
    return figures


def distractors(limit: int) -> list[tuple[str, bytes]]:
    """Real documents the questions are not about: the long descriptions (READMEs) of the Python packages
    installed here, read at run time (nothing is copied into the repository), up to about ``limit`` passages."""
    from importlib import metadata

    found, words = [], 0
    for distribution in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        text = distribution.metadata.get_payload() or distribution.metadata.get("Description") or ""
        if len(text.split()) < 200:
            continue
        found.append((f"{distribution.metadata['Name']}-README.md", text.encode()))
        words += len(text.split())
        if words > limit * 150:
            break
    return found


def pdf(pages: list[list[str]], compressed: bytes | None = None) -> bytes:
    """A plain PDF written by hand (objects, then a correct xref): each page a column of Helvetica lines, or
    ``compressed`` (a FlateDecode stream, for the bomb tests) as every page's content."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
                            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        text = " T* ".join(f"({line})Tj" for line in lines)
        body = compressed or f"BT /F1 10 Tf 12 TL 50 760 Td {text} ET".encode("latin-1")
        flate = " /Filter /FlateDecode" if compressed else ""
        objects.append(f"<< /Length {len(body)}{flate} >>\nstream\n".encode() + body + b"\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>".encode())
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>".encode()
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def sentences_of_corpus() -> list[str]:
    text = " ".join(path.read_text() for path in CORPUS.glob("*.md"))
    return [s.strip() for s in re.split(r"(?<=\.)\s+", re.sub(r"#+ [^\n]*\n", " ", text)) if len(s.split()) > 4]


def synthetic_markdown(rng: random.Random, sections: int, pool: list[str]) -> bytes:
    """A document of ``sections`` sections of five recombined corpus sentences each (one passage per section)."""
    parts = []
    for number in range(sections):
        body = " ".join(rng.choice(pool) for _ in range(5))
        parts.append(f"## Section {number} of notice {rng.randrange(10**6)}\n\n{body}\n")
    return "\n".join(parts).encode()


def fresh(location: str, embeddings: Embeddings) -> KnowledgeIndex:
    """The store at ``location``, its knowledge tables emptied (a PostgreSQL database keeps them between runs)."""
    library = KnowledgeIndex(location, embeddings)
    library.bases("eval")  # opens it: the tables exist
    library._db.rows("delete from knowledge_bases")  # documents and passages go with their bases
    return library


def speed(library: KnowledgeIndex) -> dict:
    """Pages per second for a 200-page PDF, and query latency at 1,000 and 10,000 passages."""
    rng = random.Random(7)
    pool = sentences_of_corpus()
    base = library.create_base("eval", "speed")["id"]
    pages = [[" ".join(rng.choice(pool) for _ in range(2))[:95] for _ in range(20)] for _ in range(200)]
    started = time.perf_counter()
    library.add_document("eval", base, "long.pdf", pdf(pages))
    figures = {"pages_per_second": 200 / (time.perf_counter() - started)}
    count = library.bases("eval")[0]["passages"]
    for target in (1_000, 10_000):
        while count < target:
            batch = min(500, target - count)
            count += library.add_document("eval", base, f"notices-{count}.md",
                                          synthetic_markdown(rng, batch, pool))["passages"]
        latencies = []
        for question in questions():
            begun = time.perf_counter()
            library.search([base], question["q"], 5)
            latencies.append((time.perf_counter() - begun) * 1000)
        figures[target] = (count, statistics.median(latencies), statistics.quantiles(latencies, n=20)[18])
    library.close()
    return figures


def answers(work: Path, files: list[tuple[str, bytes]]) -> dict[str, float]:
    """Accuracy without retrieval, with it, and with the model deciding what to look up (``grounding =
    "model"``), through the real service on the default model."""
    personalities = work / "personalities"
    personalities.mkdir()
    (personalities / "eval.toml").write_text(PERSONALITY)
    planned = PERSONALITY.replace('name = "eval"', 'name = "eval-planned"')
    (personalities / "eval-planned.toml").write_text(planned.replace("[sampling]", 'grounding = "model"\n\n[sampling]'))
    model = embedded_model_path()
    keys = {"LLM_API_KEYS": "reader:key-reader,stranger:key-stranger", "LLM_DATA_DIR": str(work / "data"),
            "LLM_CONTEXT_WINDOW": "4096"}
    with our_server(model, 2, personalities, name="eval", **keys) as server:
        reader = {"Authorization": "Bearer key-reader"}
        base = requests.post(f"{server.base}/knowledge/bases", json={"name": "corpus"}, headers=reader,
                             timeout=60).json()["id"]
        uploaded = requests.post(f"{server.base}/knowledge/bases/{base}/documents", headers=reader, timeout=300,
                                 files=[("file", (name, data)) for name, data in files])
        uploaded.raise_for_status()
        scores = {}
        for row, who, personality in (("without retrieval (a user without documents)", "stranger", "eval"),
                                      ("with retrieval (the user who uploaded them)", "reader", "eval"),
                                      ("with retrieval when the model decides (grounding = \"model\")", "reader",
                                       "eval-planned")):
            right = 0
            for question in questions():
                answer = requests.get(f"{server.base}/gpt/{personality}", params={"prompt": question["q"]},
                                      timeout=300, headers={"Authorization": f"Bearer key-{who}"}).text
                right += any(expected.lower() in answer.lower() for expected in question["a"])
            scores[row] = right / len(questions())
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-answers", action="store_true", help="skip the answers on the default model")
    parser.add_argument("--postgresql", metavar="URL", help="measure retrieval in this PostgreSQL database instead "
                        "of SQLite (its knowledge tables are emptied first)")
    args = parser.parse_args(argv)
    embeddings = Embeddings(load_settings({}), lambda: "")
    files = documents()
    with tempfile.TemporaryDirectory(prefix="knowledge-eval-") as directory:
        work = Path(directory)
        library = fresh(args.postgresql or str(work / "eval.db"), embeddings)
        base = library.create_base("eval", "corpus")["id"]
        for name, data in files:
            library.add_document("eval", base, name, data)
        alone = library.bases("eval")[0]["passages"]
        quality = {"alone": retrieval(library, base)}
        noise = distractors(3_000)
        for name, data in noise:
            try:
                library.add_document("eval", base, name, data)
            except Exception:  # noqa: BLE001 - a README that is not readable text is simply not a distractor
                continue
        extra = library.bases("eval")[0]["passages"]
        quality["with distractors"] = retrieval(library, base)
        library.close()
        timing = speed(fresh(args.postgresql or str(work / "speed.db"), embeddings))
        accuracy = None if args.no_answers else answers(work, files)
    store = ("PostgreSQL (tsvector, cube: 64-dimension vectors)" if args.postgresql
             else "SQLite (FTS5, sqlite-vec: 256-dimension vectors)")
    print(f"Store: {store}")
    print(f"{len(questions())} questions over {len(files)} documents "
          f"({sum(1 for n, _ in files if n.endswith('.md'))} Markdown, 1 DOCX, 1 HTML)\n")
    print("| retrieval | passages in the base | recall@1 | recall@5 | MRR |\n|---|---|---|---|---|")
    for setting, figures in quality.items():
        for mode, (first, recall, mrr) in figures.items():
            size = extra if setting != "alone" else alone
            print(f"| {mode}, {setting} | {size:,} | {first:.2f} | {recall:.2f} | {mrr:.2f} |")
    if accuracy is not None:
        print("\n| answers (embedded SmolLM2-135M, greedy, `/gpt`) | accuracy |\n|---|---|")
        for row, score in accuracy.items():
            print(f"| {row} | {score:.2f} |")
    print(f"\nIndexing: {timing['pages_per_second']:.1f} pages/s (a 200-page PDF, read, chunked, embedded, indexed)")
    print("\n| passages | hybrid query p50 (ms) | p95 (ms) |\n|---|---|---|")
    for target in (1_000, 10_000):
        count, p50, p95 = timing[target]
        print(f"| {count:,} | {p50:.1f} | {p95:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
