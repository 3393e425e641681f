"""Knowledge bases: documents read into located passages (and the files refused), the hybrid index, the /knowledge
API for owners only, and answers grounded in retrieved passages with numbered citations."""

from __future__ import annotations

import io
import json
import zipfile
import zlib

import docx
import pytest
from pypdf import PdfWriter

from bench.knowledge_eval import pdf
from llm.engine.embeddings import Embeddings
from llm.errors import BadRequest, FileTooLarge, NotFound, UnsupportedType
from llm.knowledge.documents import Limits, read
from llm.knowledge.index import KnowledgeIndex
from llm.settings import load_settings

POLICY = b"""# Holidays

Employees get 27 days of paid leave each year. Leave requests go to the line manager two weeks ahead.

# Expenses

Taxi fares are refunded only after 22:00, with a receipt. Meals abroad are covered up to 40 euros a day.
"""
KEYS = {"LLM_API_KEYS": "alice:key-alice,bob:key-bob"}
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
GUIDE = [["Boilers are serviced every May."], ["Keys are at reception."]]  # a two-page PDF's lines


def word(headings_and_text: list[tuple[str | None, str]]) -> bytes:
    document = docx.Document()
    for heading, text in headings_and_text:
        if heading:
            document.add_heading(heading, level=1)
        document.add_paragraph(text)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


# ----- reading documents ------------------------------------------------------------------------------------

def test_each_kind_is_read_into_located_passages():
    kind, passages, pages = read("policy.md", POLICY)
    assert kind == "markdown" and [p.location for p in passages] == ["Holidays", "Expenses"] and pages == 0
    kind, passages, pages = read("guide.pdf", pdf(GUIDE))
    assert kind == "pdf" and pages == 2
    assert [(p.location, p.text) for p in passages] == [("page 1", "Boilers are serviced every May."),
                                                       ("page 2", "Keys are at reception.")]
    kind, passages, _ = read("notes.docx", word([("Parking", "Visitors park on level 2."), (None, "Bikes go inside.")]))
    assert kind == "docx" and passages[0].location == "Parking" and "Bikes go inside." in passages[0].text
    page = b"<html><body><nav>Menu</nav><h1>Canteen</h1><p>Lunch is served from noon.</p><script>x()</script></body>"
    kind, passages, _ = read("canteen.html", page)
    assert kind == "html" and passages[0].location == "Canteen" and "Lunch is served from noon." in passages[0].text
    assert "Menu" not in passages[0].text and "x()" not in passages[0].text
    assert read("readme", b"Plain words.")[0] == "text"
    assert read("mislabelled.txt", pdf([["Still a PDF."]]))[0] == "pdf"  # the bytes win over the name


def test_long_sections_overlap_by_a_sentence():
    sentences = " ".join(f"Sentence number {n} says something about topic {n}." for n in range(80))
    _, passages, _ = read("long.md", f"# Topic\n\n{sentences}".encode())
    assert len(passages) > 1 and all(p.location == "Topic" for p in passages)
    for before, after in zip(passages, passages[1:], strict=False):
        last = before.text.rsplit("Sentence number", 1)[1]
        assert after.text.startswith(f"Sentence number{last}")  # the next opens with the last sentence


@pytest.mark.parametrize(("name", "data", "error", "message"), [
    ("x.bin", b"\x00\x01\x02binary", UnsupportedType, "neither"),
    ("x.xlsx", None, UnsupportedType, "not a Word document"),
    ("x.exe", b"MZ plausible text", UnsupportedType, "only PDF"),
    ("empty.txt", b"  \n", BadRequest, "empty"),
    ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", BadRequest, "not a readable PDF"),
    ("scan.pdf", "blank", BadRequest, "no text"),
    ("bomb.docx", "bomb", FileTooLarge, "archive bomb"),
    ("big.txt", b"a" * 3000, FileTooLarge, "limit is 2048"),
])
def test_what_is_refused_and_why(name, data, error, message):
    if data is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("xl/workbook.xml", "<workbook/>")
        data = buffer.getvalue()
    elif data == "blank":
        writer, buffer = PdfWriter(), io.BytesIO()
        writer.add_blank_page(612, 792)
        writer.write(buffer)
        data = buffer.getvalue()
    elif data == "bomb":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("word/document.xml", b"<w:document>" + b" " * 5_000_000 + b"</w:document>")
        data = buffer.getvalue()
    with pytest.raises(error, match=message):
        read(name, data, Limits(max_bytes=2048 if name == "big.txt" else 20_000_000))


def test_encrypted_and_bomb_pdfs_are_refused():
    writer, buffer = PdfWriter(), io.BytesIO()
    writer.add_blank_page(612, 792)
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(buffer)
    with pytest.raises(BadRequest, match="encrypted"):
        read("locked.pdf", buffer.getvalue())
    bomb = zlib.compress(b"0" * 120_000_000, 9)  # ~120 KB that inflates to 120 MB
    with pytest.raises(FileTooLarge, match="PDF bomb"):
        read("bomb.pdf", pdf([["x"]], compressed=bomb))


# ----- the index --------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    """The store on SQLite (FTS5, sqlite-vec) and on PostgreSQL (tsvector, cube), emptied for each test."""
    location = str(tmp_path / "knowledge.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    library = KnowledgeIndex(location, Embeddings(load_settings({}), lambda: ""))
    if request.param == "postgresql":
        library.bases("nobody")  # opens it: the schema exists
        library._db.rows("truncate knowledge_bases, knowledge_documents, knowledge_passages")
    yield library
    library.close()


def test_hybrid_search_finds_by_words_and_by_meaning(index):
    base = index.create_base("alice", "handbook")["id"]
    index.add_document("alice", base, "policy.md", POLICY)
    index.add_document("alice", base, "guide.pdf", pdf(GUIDE))
    assert index.search([base], "taxi refund", 1)[0].location == "Expenses"  # shared words
    assert index.search([base], "How many vacation days do employees get?", 1, "vector")[0].location == "Holidays"
    hit = index.search([base], "When is the boiler serviced?", 1)[0]
    assert (hit.document, hit.location) == ("guide.pdf", "page 1")
    listed = index.bases("alice")[0]
    assert (listed["name"], listed["documents"], listed["passages"]) == ("handbook", 2, 4)


def test_owners_only_and_deletes_remove_passages(index):
    base = index.create_base("alice", "handbook")["id"]
    document = index.add_document("alice", base, "policy.md", POLICY)["id"]
    with pytest.raises(NotFound):
        index.documents("bob", base)
    with pytest.raises(NotFound):
        index.add_document("bob", base, "x.md", b"# Mine now")
    assert index.searchable("bob") == [] and index.searchable("bob", ["alice/handbook"]) == [base]
    assert index.searchable(None, ["alice/handbook", "alice/missing"]) == [base]
    with pytest.raises(BadRequest, match="already have"):
        index.create_base("alice", "handbook")
    assert index.reindex("alice", base, document)["passages"] == 2
    index.delete_document("alice", base, document)
    assert index.search([base], "taxi", 5) == [] and index.search([base], "taxi", 5, "vector") == []
    index.delete_base("alice", base)
    assert index.bases("alice") == []


def test_quota_and_reopening(tmp_path):
    path = str(tmp_path / "k.db")
    library = KnowledgeIndex(path, None, quota_bytes=len(POLICY) + 10)
    base = library.create_base("alice", "b")["id"]
    library.add_document("alice", base, "policy.md", POLICY)
    with pytest.raises(FileTooLarge, match="each user may keep"):
        library.add_document("alice", base, "more.md", POLICY)
    library.close()
    again = KnowledgeIndex(path, Embeddings(load_settings({}), lambda: ""))  # a model now: passages embedded
    assert again.search([base], "paid leave for employees", 1, "vector")[0].location == "Holidays"
    again.close()


# ----- the API and grounded answers ---------------------------------------------------------------------------

def upload(client, base, *files, headers=ALICE):
    data = {"file": [(io.BytesIO(content), name) for name, content in files]}
    return client.post(f"/knowledge/bases/{base}/documents", data=data, headers=headers,
                       content_type="multipart/form-data")


def test_the_api_for_owners(make_app):
    app = make_app(**KEYS)
    client = app.test_client()
    assert client.get("/knowledge/bases").status_code == 401
    created = client.post("/knowledge/bases", json={"name": "handbook"}, headers=ALICE)
    assert created.status_code == 201
    base = created.get_json()["id"]
    assert client.post("/knowledge/bases", json={"name": "../x"}, headers=ALICE).status_code == 400
    response = upload(client, base, ("policy.md", POLICY), ("virus.exe", b"\x00MZ"))
    assert response.status_code == 201
    statuses = [(d["name"], d["status"]) for d in response.get_json()["documents"]]
    assert statuses == [("policy.md", "indexed"), ("virus.exe", "refused")]
    assert response.get_json()["documents"][1]["error"]["status"] == 415
    assert upload(client, base, ("virus.exe", b"\x00MZ")).status_code == 415  # none added: that file's error
    document = response.get_json()["documents"][0]["document"]["id"]
    shown = client.get(f"/knowledge/bases/{base}", headers=ALICE).get_json()
    assert shown["base"]["documents"] == 1 and [d["name"] for d in shown["documents"]] == ["policy.md"]
    assert client.get(f"/knowledge/bases/{base}", headers=BOB).status_code == 404
    assert upload(client, base, ("x.md", b"# x"), headers=BOB).status_code == 404
    found = client.get("/knowledge/search", query_string={"q": "taxi after ten"}, headers=ALICE).get_json()
    assert found["passages"][0]["location"] == "Expenses"
    assert client.get("/knowledge/search", query_string={"q": "taxi"}, headers=BOB).get_json()["passages"] == []
    with client.get(f"/knowledge/bases/{base}/documents/{document}/file", headers=ALICE) as original:
        assert original.data == POLICY and original.headers["Content-Disposition"].startswith("attachment")
        assert original.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get(f"/knowledge/bases/{base}/documents/{document}/file", headers=BOB).status_code == 404
    assert client.get(f"/knowledge/bases/{base}/documents/{document}/file").status_code == 401
    assert client.delete(f"/knowledge/bases/{base}/documents/{document}", headers=BOB).status_code == 404
    assert client.delete(f"/knowledge/bases/{base}/documents/{document}", headers=ALICE).status_code == 204
    assert client.delete(f"/knowledge/bases/{base}", headers=ALICE).status_code == 204
    assert client.get("/knowledge/bases", headers=ALICE).get_json() == {"bases": []}


def test_answers_cite_retrieved_passages(make_app, fake_engine, tmp_path):
    directory = tmp_path / "personalities"
    directory.mkdir()
    from tests.conftest import TEST_PERSONALITIES

    for source in TEST_PERSONALITIES.glob("*.toml"):
        (directory / source.name).write_text(source.read_text())
    text = (TEST_PERSONALITIES / "greedy.toml").read_text().replace('name = "greedy"', 'name = "hr"')
    (directory / "hr.toml").write_text(text.replace("[sampling]", 'knowledge_bases = ["alice/handbook"]\n\n[sampling]'))
    app = make_app(LLM_PERSONALITIES_DIR=str(directory), **KEYS)
    client = app.test_client()
    base = client.post("/knowledge/bases", json={"name": "handbook"}, headers=ALICE).get_json()["id"]
    assert upload(client, base, ("policy.md", POLICY)).status_code == 201

    with client.get("/gpt/greedy", query_string={"prompt": "Can I take a taxi home at midnight?"},
                    headers=ALICE) as answer:
        sources = json.loads(answer.headers["X-Sources"])
    prompt = fake_engine.requests[-1].messages[-1]["content"]
    assert "[1] From policy.md (Expenses):" in prompt and "cite its number in brackets" in prompt
    assert sources[0] == {"title": "policy.md, Expenses", "number": 1,
                          "url": f"/knowledge/bases/{base}/documents/1/file"}

    with client.get("/gpt/greedy", query_string={"prompt": "Can I take a taxi home?"}, headers=BOB):
        assert "policy.md" not in fake_engine.requests[-1].messages[-1]["content"]  # not Bob's base
    with client.get("/gpt/hr", query_string={"prompt": "Can I take a taxi home?"}, headers=BOB) as answer:
        assert "[1] From policy.md (Expenses):" in fake_engine.requests[-1].messages[-1]["content"]  # shared
        link = json.loads(answer.headers["X-Sources"])[0]["url"]
    with client.get(link, headers=BOB) as shared:  # a shared base's documents are readable by whoever it cites
        assert shared.status_code == 200 and shared.data == POLICY
    assert client.get(f"/knowledge/bases/{base}/documents", headers=BOB).status_code == 404  # but not listable
    assert client.post(f"/knowledge/bases/{base}/documents/1/reindex", headers=BOB).status_code == 404


def test_the_evaluation_corpus_holds_every_answer_where_it_says():
    """bench/knowledge_eval.py's 48 questions: each names a real section of a real document that holds its answer."""
    from bench.knowledge_eval import CORPUS, questions

    asked = questions()
    assert len(asked) >= 40
    for question in asked:
        text = (CORPUS / question["doc"]).read_text()
        section = " ".join(text.split(f"## {question['at']}\n", 1)[1].split("\n## ", 1)[0].split()).lower()
        assert any(answer.lower() in section for answer in question["a"]), question["q"]


@pytest.fixture
def planned(make_app, tmp_path):
    """A service whose personality "planner" lets the model decide what to look up; Alice has uploaded POLICY."""
    from tests.conftest import TEST_PERSONALITIES

    directory = tmp_path / "personalities"
    directory.mkdir()
    text = (TEST_PERSONALITIES / "greedy.toml").read_text().replace('name = "greedy"', 'name = "planner"')
    (directory / "planner.toml").write_text(text.replace("[sampling]", 'grounding = "model"\n\n[sampling]'))
    (directory / "greedy.toml").write_text((TEST_PERSONALITIES / "greedy.toml").read_text())
    app = make_app(LLM_PERSONALITIES_DIR=str(directory), **KEYS)
    client = app.test_client()
    base = client.post("/knowledge/bases", json={"name": "handbook"}, headers=ALICE).get_json()["id"]
    upload(client, base, ("policy.md", POLICY))
    return app


def ask_socket(server, prompt: str, key: str = "key-alice") -> list[dict]:
    import websocket

    ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/planner?format=json", timeout=30,
                                     header=[f"Authorization: Bearer {key}"])
    try:
        ws.send(prompt)
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv()))
        return frames
    finally:
        ws.close()


@pytest.mark.parametrize(("decision", "status", "grounded"), [
    ({"retrieve": True, "sources": ["documents"], "query": "taxi refund at night"},
     "Looking up documents: “taxi refund at night”", True),
    ({"retrieve": False, "sources": [], "query": ""}, "Answering without looking anything up.", False),
    ("not JSON at all", "Could not decide what to look up; using every source.", True),
])
def test_the_model_decides_what_to_look_up(planned, fake_engine, decision, status, grounded):
    from tests.conftest import LiveServer

    fake_engine.script(json.dumps(decision) if isinstance(decision, dict) else decision)
    fake_engine.script("An answer.")
    server = LiveServer(planned)
    try:
        frames = ask_socket(server, "Will I get my cab fare back after the party?")
    finally:
        server.close()
    planning, answering = fake_engine.requests[-2:]
    offered = planning.constraint.schema["properties"]["sources"]["items"]["enum"]
    assert offered == ["documents"]  # only what this user could use: no feeds, no web search configured
    assert [f["message"] for f in frames if f["type"] == "status"][0] == status
    assert ("[1] From policy.md (" in answering.messages[-1]["content"]) is grounded
    titles = [f["title"] for f in frames if f["type"] == "source"]
    assert sorted(titles) == (["policy.md, Expenses", "policy.md, Holidays"] if grounded else [])
    if isinstance(decision, dict) and grounded:  # the model's query, not the question's words, was searched
        assert titles[0] == "policy.md, Expenses"


def test_nothing_to_decide_without_sources(planned, fake_engine):
    client = planned.test_client()
    with client.get("/gpt/planner", query_string={"prompt": "Hello?"}, headers=BOB):
        pass
    assert len(fake_engine.requests) == 1 and fake_engine.requests[0].constraint is None  # Bob has no documents


def test_a_broken_store_costs_the_passages_not_the_answer(make_app, tmp_path, fake_engine):
    """A knowledge store that cannot be opened (here: a file that is not a database) leaves chat working, with a
    notice saying the documents were not searched."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "knowledge.db").write_bytes(b"this is not a database" * 100)
    app = make_app(**KEYS)
    with app.test_client() as client, client.get("/gpt/greedy", query_string={"prompt": "Taxi?"},
                                                 headers=ALICE) as answer:
        assert answer.status_code == 200
        assert "could not be searched" in json.loads(answer.headers["X-Notices"])[0]


def test_api_clients_ask_for_their_own_documents(make_app, fake_engine):
    """/v1 and /v1/messages bring their own context: the caller's bases ground them only with "knowledge": true;
    a bad value is a 400 naming it."""
    app = make_app(**KEYS)
    client = app.test_client()
    base = client.post("/knowledge/bases", json={"name": "handbook"}, headers=ALICE).get_json()["id"]
    upload(client, base, ("policy.md", POLICY))
    question = [{"role": "user", "content": "Are taxi fares refunded?"}]
    for extra, grounded in (({}, False), ({"knowledge": True}, True)):
        with client.post("/v1/chat/completions", headers=ALICE,
                         json={"model": "greedy", "messages": question, **extra}) as answer:
            assert answer.status_code == 200
        assert ("From policy.md" in fake_engine.requests[-1].messages[-1]["content"]) is grounded
        with client.post("/v1/messages", headers=ALICE,
                         json={"model": "greedy", "max_tokens": 8, "messages": question, **extra}) as answer:
            assert answer.status_code == 200
        assert ("From policy.md" in fake_engine.requests[-1].messages[-1]["content"]) is grounded
    with client.post("/v1/chat/completions", headers=ALICE,
                     json={"model": "greedy", "messages": question, "knowledge": "yes"}) as refused:
        assert refused.status_code == 400 and refused.get_json()["error"]["param"] == "knowledge"


def test_a_postgresql_store_leaves_no_connection_to_the_garbage_collector(postgres_url, make_app):
    """Apps are built and dropped (tests, reloads): the PostgreSQL store's connections come from a pool, so none
    is found open by the garbage collector (a ResourceWarning, an error under this suite's filterwarnings)."""
    import gc

    app = make_app(DATABASE_URL=postgres_url, **KEYS)
    with app.test_client() as client, client.get("/gpt/greedy", query_string={"prompt": "Hi"}, headers=ALICE) as r:
        assert r.status_code == 200
    assert app.extensions["llm"].knowledge._db is not None  # Alice's question opened the store
    del app, client, r
    gc.collect()
