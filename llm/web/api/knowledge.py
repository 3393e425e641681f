"""Knowledge bases for their owner: create, list, delete; add documents (multipart upload, one or more files, a
status per file), download, re-index and delete them; search (what the answers will be grounded in).

Every route acts for the signed-in user (an API key, or the chat page's cookie) on their own bases only: another
user's base is a 404, never a 403 (its existence is theirs too). Requests without an identity of their own (no key
on a keyless service, and no page cookie) are refused: they would all share one owner.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from llm.errors import BadRequest, ServiceError, Unauthorized
from llm.web.api import services
from llm.web.auth import ANONYMOUS, current_user

blueprint = Blueprint("knowledge", __name__)
MAX_FILES = 20  # per upload request
MEDIA = {"pdf": "application/pdf", "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
         "markdown": "text/markdown; charset=utf-8", "text": "text/plain; charset=utf-8",
         "html": "application/octet-stream"}  # an uploaded page is never rendered from this origin


def library():
    return services().knowledge


def owner() -> str:
    user = current_user()
    if user == ANONYMOUS:
        raise Unauthorized("Knowledge bases belong to a user: send an API key, or use the chat page.")
    return user


@blueprint.get("/knowledge/bases")
def list_bases():
    return jsonify({"bases": library().bases(owner())})


@blueprint.post("/knowledge/bases")
def create_base():
    body = request.get_json(silent=True) if request.is_json else None
    if not isinstance(body, dict):
        raise BadRequest("Send {\"name\": \"...\"}.")
    return jsonify(library().create_base(owner(), body.get("name"))), 201


@blueprint.get("/knowledge/bases/<int:base_id>")
def get_base(base_id: int):
    user = owner()
    return jsonify({"base": library().base(user, base_id), "documents": library().documents(user, base_id)})


@blueprint.delete("/knowledge/bases/<int:base_id>")
def delete_base(base_id: int):
    library().delete_base(owner(), base_id)
    return "", 204


@blueprint.post("/knowledge/bases/<int:base_id>/documents")
def add_documents(base_id: int):
    """Each ``file`` part is read and indexed on its own: one refused file (with its 4xx error) does not cost the
    others. 201 when at least one was added; when none was, the first file's error status."""
    user = owner()
    settings = services().settings
    request.max_content_length = MAX_FILES * settings.knowledge_max_file_bytes + 1_000_000
    library().base(user, base_id)
    files = request.files.getlist("file")
    if not files:
        raise BadRequest("Upload the documents as multipart/form-data parts named 'file'.", param="file")
    if len(files) > MAX_FILES:
        raise BadRequest(f"At most {MAX_FILES} files per upload.", param="file")
    results, first_error = [], None
    for upload in files:
        name = upload.filename or "document"
        data = upload.stream.read(settings.knowledge_max_file_bytes + 1)
        try:
            results.append({"name": name, "status": "indexed",
                            "document": library().add_document(user, base_id, name, data)})
        except ServiceError as error:
            first_error = first_error or error
            results.append({"name": name, "status": "refused",
                            "error": {"message": error.message, "type": error.type, "status": error.status}})
    added = any(result["status"] == "indexed" for result in results)
    status = 201 if added else first_error.status
    return jsonify({"documents": results}), status


@blueprint.get("/knowledge/bases/<int:base_id>/documents")
def list_documents(base_id: int):
    return jsonify({"documents": library().documents(owner(), base_id)})


def shared_with_everyone(base_id: int) -> bool:
    """Whether a personality names this base in its file (then anyone who may talk to it may read its documents)."""
    personalities = services().personalities
    return any(library().shared(reference) == base_id for personality in personalities.all()
               for reference in personality.knowledge_bases)


@blueprint.get("/knowledge/bases/<int:base_id>/documents/<int:document_id>/file")
def download(base_id: int, document_id: int):
    """The document as uploaded: PDFs open in the browser (citations link to their page), the rest download. Its
    owner's, or anyone's when a personality shares its base (their answers cite it)."""
    reader = None if shared_with_everyone(base_id) else owner()
    name, kind, data = library().original(reader, base_id, document_id)
    disposition = "inline" if kind == "pdf" else "attachment"
    safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in name)
    headers = {"Content-Disposition": f'{disposition}; filename="{safe}"', "X-Content-Type-Options": "nosniff",
               "Cache-Control": "private, no-store"}
    if kind != "pdf":  # the browser's PDF viewer does not open under a sandbox; the rest is only downloaded
        headers["Content-Security-Policy"] = "sandbox"
    return Response(data, content_type=MEDIA[kind], headers=headers)


@blueprint.post("/knowledge/bases/<int:base_id>/documents/<int:document_id>/reindex")
def reindex(base_id: int, document_id: int):
    return jsonify(library().reindex(owner(), base_id, document_id))


@blueprint.delete("/knowledge/bases/<int:base_id>/documents/<int:document_id>")
def delete_document(base_id: int, document_id: int):
    library().delete_document(owner(), base_id, document_id)
    return "", 204


@blueprint.get("/knowledge/search")
def search():
    """What a question would retrieve from the user's bases (all, or those named by ``base``)."""
    user = owner()
    question = request.args.get("q", "").strip()
    if not question or len(question) > 2000:
        raise BadRequest("'q' must be a question of 1 to 2000 characters.", param="q")
    mine = {base["id"] for base in library().bases(user)}
    asked = {int(b) for b in request.args.getlist("base") if b.isdigit()} or mine
    if not asked <= mine:
        raise BadRequest("'base' names a knowledge base that is not yours.", param="base")
    limit = request.args.get("limit", "5")
    if not limit.isdigit() or not 1 <= int(limit) <= 50:
        raise BadRequest("'limit' must be an integer from 1 to 50.", param="limit")
    hits = library().search(sorted(asked), question, int(limit))
    return jsonify({"passages": [{"base": hit.base_id, "document": hit.document, "document_id": hit.document_id,
                                  "location": hit.location, "text": hit.text, "score": round(hit.score, 6)}
                                 for hit in hits]})
