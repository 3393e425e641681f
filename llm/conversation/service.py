"""One conversational turn for any endpoint: personality, context, budget, submit, record.

``/gpt``, the websocket, ``/toil`` and the OpenAI API all go through ``ChatService.start`` and ``Turn.finish``
so they share one behaviour: RAG context, the date outside the cached prefix, the token budget with its
trimming policy, and history kept for the next turn.

Budget policy: the reply reserve is ``min(max_tokens, window / 4)``. When system prompt, context, history and
the new prompt do not fit in ``window - reserve``, the oldest turns are dropped (in user/assistant pairs)
until the prompt takes at most 3/4 of that, so trimming, which invalidates the cached history, happens once
every several turns rather than at every turn. The client is told how many turns were dropped. With the
``summarize`` policy the dropped turns are first folded into a short summary written by the model, which then
rides in the system prompt. A prompt that does not fit even with no history is a 413.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llm.conversation import grounding
from llm.conversation.store import LAST
from llm.conversation.turns import Conversation, Turn, title_of
from llm.engine import Engine, GenerationRequest, GrammarConstraint, Handle, JsonConstraint, SamplingParams
from llm.engine.tools import ToolFormat, ToolUse, model_history, tool_format
from llm.errors import BadRequest, PayloadTooLarge
from llm.models import ModelSpec
from llm.personalities import Personality

MAX_PROMPT_CHARS = 200_000
ANONYMOUS = "anonymous"
# The date line in the personality's language. Two languages do not warrant a locale library (and the process's
# locale must not change per request); a language without an entry gets English.
DATE_LINES = {
    "en": ("(Today is {weekday} {day:02d} {month} {year}.)",
           ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
           ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
            "November", "December")),
    "fr": ("(Nous sommes le {weekday} {day} {month} {year}.)",
           ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
           ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
            "novembre", "décembre")),
}


def date_line(today: datetime.date, language: str) -> str:
    """``(Today is Friday 04 December 2026.)``, or ``(Nous sommes le vendredi 4 décembre 2026.)`` in French."""
    template, weekdays, months = DATE_LINES.get(language.split("-")[0].lower(), DATE_LINES["en"])
    return template.format(weekday=weekdays[today.weekday()], day=today.day, month=months[today.month - 1],
                           year=today.year)

SUMMARY_TOKENS = 160


def check_prompt(prompt: Any) -> str:
    """A prompt is a non-empty string of bounded size."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("Missing or empty 'prompt'.", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PayloadTooLarge(f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if "\x00" in prompt:
        raise BadRequest("The prompt contains a NUL character.", param="prompt")
    return prompt


def sampling_for(personality: Personality, overrides: dict[str, Any] | None) -> SamplingParams:
    """The personality's sampling settings with the request's own values on top (a value the request leaves out,
    None, keeps the personality's)."""
    chosen = {key: value for key, value in (overrides or {}).items() if value is not None}
    return SamplingParams.from_mapping({**personality.sampling, **chosen})


@dataclass
class ActiveTurn:
    """A submitted turn: iterate ``pieces()``, then call ``finish()`` to record it in the conversation."""

    service: ChatService
    conversation: Conversation | None
    user_turn: Turn
    handle: Handle
    trimmed: int
    sources: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    personality: str = ""
    channel: str = ""  # which endpoint: gpt, socket, toil, openai
    user: str | None = None
    text: str = ""
    error: Exception | None = None
    assistant_turn: Turn | None = None
    tools: ToolUse | None = None  # the request's tools in the model's format (for reading the answer)
    parent: Any = LAST  # the message this exchange continues (an edit or a regeneration branches off)

    def pieces(self) -> Iterator[str]:
        """The answer's text pieces; the service's observer hears about the turn once it ends, however it ends."""
        try:
            for piece in self.handle:
                self.text += piece
                yield piece
        except Exception as exc:
            self.error = exc
            raise
        finally:
            self._tell_observer()

    def take(self) -> tuple[list[str], bool]:
        """``pieces()`` without waiting, for a consumer that ``handle.listen``s: what has arrived, and whether the
        answer has ended; ``ended()`` follows the end."""
        pieces, done = self.handle.take()
        self.text += "".join(pieces)
        return pieces, done

    def ended(self, error: BaseException | None = None) -> None:
        """After ``take`` (or ``error``): raise what the answer failed with and tell the observer, as the end of
        ``pieces()`` does."""
        try:
            error = error or self.handle.error
            if error is not None:
                self.error = error
                raise error
        finally:
            self._tell_observer()

    def _tell_observer(self) -> None:
        """The turn has ended (however it ended): the service's observer, if any, hears of it."""
        if self.service.observer is not None:
            self.service.observer.turn_finished(self)

    def finish(self) -> None:
        """Keep the exchange (a stopped answer keeps what the user saw) with the answer's figures; a regenerated
        answer joins the question it answers again."""
        if self.conversation is None or self.handle.error is not None:
            return
        self.assistant_turn = Turn("assistant", self.text, sources=self.sources)
        regenerated = self.user_turn.message_id is not None
        self.service.store.append(self.conversation,
                                  [self.assistant_turn] if regenerated else [self.user_turn, self.assistant_turn],
                                  self.handle.usage.as_dict(), parent=self.parent)

    def cancel(self) -> None:
        self.handle.cancel()


class ChatService:
    """Turns prompts into engine requests for personalities."""

    def __init__(self, engine: Engine, personalities, store, specs: Callable[[Personality], ModelSpec],
                 preprocessor=None, clock: Callable[[], datetime.datetime] = datetime.datetime.now, observer=None,
                 max_prompt_tokens: int = 0):
        self.observer = observer  # has turn_finished(ActiveTurn): metrics and logs
        self.max_prompt_tokens = max_prompt_tokens
        self.engine = engine
        self.personalities = personalities
        self.store = store
        self.spec_for = specs
        self.preprocessor = preprocessor
        self.clock = clock

    def start(self, personality_name: str, prompt: Any, *, conversation_id: str | None = None,
              remember: bool = True, constraint: JsonConstraint | None = None, extra_context: str = "",
              sampling: dict[str, Any] | None = None, on_status: Callable[[str], None] | None = None,
              system_prompt: str | None = None, channel: str = "", user: str | None = None,
              timeout: float | None = None, regenerate: bool = False, edit: int | None = None) -> ActiveTurn:
        """Prepare and submit one turn; raises the ServiceError that stops it before generation.

        ``regenerate``: answer the conversation's last question again (a new variant of its answer; ``prompt``
        is ignored); ``edit``: ``prompt`` replaces the question with that message id (a new variant of it, the
        conversation continuing from there). Earlier variants are kept (``ConversationStore.choose``)."""
        personality = self.personalities.get(personality_name)
        spec = self.spec_for(personality)
        params = sampling_for(personality, sampling)
        conversation = self.store.open(conversation_id, personality.name, user or ANONYMOUS) if remember else None
        if regenerate:
            user_turn, parent = _last_question(conversation)
            sources, notices = user_turn.sources, []
        else:
            prompt = check_prompt(prompt)
            self._check_prompt_tokens(spec, prompt)
            question, context, sources, notices = self._prepare(personality, spec, prompt, on_status, user)
            if extra_context:
                context = f"{extra_context}\n\n{context}".strip()
            user_turn = Turn("user", self._user_content(personality, question, context), display=prompt,
                             sources=sources)
            parent = _branch_before(conversation, edit) if edit is not None else LAST
            if conversation is not None and not conversation.title:
                conversation.title = title_of(question)
        system = system_prompt if system_prompt is not None else personality.system_prompt
        messages, trimmed = self._fit(personality, spec, conversation, system, user_turn, params)
        handle = self.engine.submit(GenerationRequest(
            model=spec, messages=messages, sampling=params, constraint=constraint,
            conversation=conversation.key if conversation else None, timeout=timeout,
            **self._privacy(personality, user)))
        return ActiveTurn(self, conversation, user_turn, handle, trimmed, sources, notices, personality.name, channel,
                          user, parent=parent)

    def start_messages(self, personality_name: str, messages: Any, *, constraint: JsonConstraint | None = None,
                       sampling: dict[str, Any] | None = None, channel: str = "openai",
                       user: str | None = None, timeout: float | None = None,
                       tools: ToolUse | None = None, knowledge: bool = False) -> ActiveTurn:
        """A turn from client-held history (OpenAI style): the personality's system prompt is prepended unless
        the client brings its own, and the RAG preprocessor applies to the last user message (never to tool
        results). ``tools``: described to the model in its own format, and a grammar makes every call valid.
        ``knowledge``: the user's own knowledge bases ground it too (API clients bring their own context, so
        only when asked; a personality's shared bases always do)."""
        personality = self.personalities.get(personality_name)
        spec = self.spec_for(personality)
        form = self._tool_format(spec)
        messages, tools = self._client_history(personality, messages, tools, form)
        params = sampling_for(personality, sampling)
        if tools is not None:
            constraint = GrammarConstraint(tools.grammar(), tools.format.special)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user" and (
            m["content"] or not m.get("results"))), default=None)
        sources, notices = [], []
        if last_user is not None:
            check_prompt(messages[last_user]["content"])
            self._check_prompt_tokens(spec, messages[last_user]["content"])
            question, context, sources, notices = self._prepare(personality, spec, messages[last_user]["content"],
                                                                None, user, private=knowledge)
            messages[last_user]["content"] = self._user_content(personality, question, context)
        messages = model_history(messages, form, tools)
        handle = self.engine.submit(GenerationRequest(model=spec, messages=messages, sampling=params,
                                                      constraint=constraint, timeout=timeout,
                                                      **self._privacy(personality, user)))
        return ActiveTurn(self, None, Turn("user", messages[-1]["content"]), handle, 0, sources, notices,
                          personality.name, channel, user, tools=tools)

    def count_message_tokens(self, personality_name: str, messages: Any, tools: ToolUse | None = None) -> int:
        """Tokens client-held history takes as the model would read it (no RAG: nothing is fetched to count)."""
        personality = self.personalities.get(personality_name)
        spec = self.spec_for(personality)
        form = self._tool_format(spec)
        messages, tools = self._client_history(personality, messages, tools, form)
        return self.engine.count_tokens(spec, model_history(messages, form, tools))

    def _tool_format(self, spec: ModelSpec) -> ToolFormat:
        return tool_format(self.engine.tool_format(spec))

    @staticmethod
    def _client_history(personality: Personality, messages: Any, tools: ToolUse | None,
                        form: ToolFormat) -> tuple[list[dict], ToolUse | None]:
        """Validated history with the system prompt and the tools in the model's format (tool use still marked)."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list.", param="messages")
        tools = tools.formatted(form) if tools is not None else None
        messages = [message_text(message, index) for index, message in enumerate(messages)]
        return with_system_prompt(messages, personality, tools), tools

    def start_raw(self, personality_name: str, prompt: Any, sampling: dict[str, Any] | None = None,
                  channel: str = "openai", user: str | None = None) -> ActiveTurn:
        """Plain text completion with a personality's model and sampling defaults (no chat formatting)."""
        personality = self.personalities.get(personality_name)
        prompt = check_prompt(prompt)
        spec = self.spec_for(personality)
        self._check_prompt_tokens(spec, prompt)
        params = sampling_for(personality, sampling)
        handle = self.engine.submit(GenerationRequest(model=spec, raw_prompt=prompt, sampling=params,
                                                      owner=user or ANONYMOUS))
        return ActiveTurn(self, None, Turn("user", prompt), handle, 0, personality=personality.name, channel=channel,
                          user=user)

    @staticmethod
    def _privacy(personality: Personality, user: str | None) -> dict[str, Any]:
        """Whose text a request carries, and the part of it that is public: the personality's system prompt and the
        template's opening of the user's turn (anyone may render those)."""
        return {"owner": user or ANONYMOUS,
                "public_prefix": ({"role": "system", "content": personality.system_prompt},
                                  {"role": "user", "content": ""})}

    def _check_prompt_tokens(self, spec: ModelSpec, prompt: str) -> None:
        """LLM_MAX_PROMPT_TOKENS caps what one message may cost, whatever the context window allows."""
        if self.max_prompt_tokens:
            tokens = self.engine.count_text_tokens(spec, prompt)
            if tokens > self.max_prompt_tokens:
                raise PayloadTooLarge(f"The prompt has {tokens} tokens; the limit is {self.max_prompt_tokens}.")

    def _prepare(self, personality: Personality, spec: ModelSpec, prompt: str, on_status, user: str | None,
                 private: bool = True):
        """RAG for one prompt; ``private``: the user's own knowledge bases are searched (the personality's shared
        ones always are)."""
        if self.preprocessor is None:
            return prompt, "", [], []
        reader = user if private and user and user != ANONYMOUS else None
        plan = None
        if personality.grounding == "model":  # the model chooses what to look up, first
            offered = self.preprocessor.sources(reader, personality.knowledge_bases, personality.feeds)
            if offered:
                plan = grounding.decide(self.engine, spec, user or ANONYMOUS, prompt, offered)
                if on_status is not None:
                    on_status(grounding.describe(plan, offered))
        prepared = self.preprocessor.prepare(
            prompt, count_tokens=lambda text: self.engine.count_text_tokens(spec, text),
            feeds=list(personality.feeds), knowledge=list(personality.knowledge), on_status=on_status,
            reader=reader, shared_bases=personality.knowledge_bases, plan=plan)
        sources = [{"title": source.title, "url": source.url, **({"number": source.number} if source.number else {})}
                   for source in prepared.sources]
        return prepared.question, prepared.context, sources, list(prepared.notices)

    def _user_content(self, personality: Personality, question: str, context: str) -> str:
        """What the model reads for this turn: date and context ride here, outside the cached system prompt."""
        parts = []
        if personality.include_date:
            parts.append(date_line(self.clock(), personality.language))
        if context:
            parts.append(f"Context:\n\"\"\"\n{context}\n\"\"\"\n")
        parts.append(question)
        return "\n".join(parts)

    def _fit(self, personality: Personality, spec: ModelSpec, conversation: Conversation | None, system: str,
             user_turn: Turn, params: SamplingParams) -> tuple[list[dict], int]:
        """Messages within the token budget; returns them and how many turns were dropped this time."""
        window = spec.context_window
        limit = window - min(params.max_tokens, window // 4)

        def build(conv_summary: str, history: list[dict]) -> list[dict]:
            text = system if not conv_summary else f"{system}\n\nSummary of the earlier conversation: {conv_summary}"
            return [{"role": "system", "content": text}, *history, {"role": "user", "content": user_turn.content}]

        alone = self.engine.count_tokens(spec, build("", []))
        if alone > limit:
            raise PayloadTooLarge(
                f"The prompt needs {alone} tokens (system prompt and context included) but at most {limit} of the "
                f"{window}-token context window are available for it; shorten the prompt or its context.")
        if conversation is None:
            return build("", []), 0
        with conversation.lock:
            messages = build(conversation.summary, conversation.messages())
            if self.engine.count_tokens(spec, messages) <= limit:
                return messages, 0
            dropped = self._trim(conversation, spec, build, int(limit * 0.75))
            if personality.history_policy == "summarize" and dropped:
                conversation.summary = self._summarize(spec, conversation, dropped)
            return build(conversation.summary, conversation.messages()), len(dropped)

    def _trim(self, conversation: Conversation, spec: ModelSpec, build, target: int) -> list[Turn]:
        dropped = []
        while conversation.first_kept < len(conversation.turns):
            step = 2 if conversation.first_kept + 1 < len(conversation.turns) else 1
            dropped.extend(conversation.turns[conversation.first_kept:conversation.first_kept + step])
            conversation.first_kept += step
            if self.engine.count_tokens(spec, build(conversation.summary, conversation.messages())) <= target:
                break
        return dropped

    def _summarize(self, spec: ModelSpec, conversation: Conversation, dropped: list[Turn]) -> str:
        """Memory compression: the model folds the dropped turns (and the old summary) into a few sentences."""
        transcript = "\n".join(f"{turn.role}: {turn.content}" for turn in dropped)
        if conversation.summary:
            transcript = f"Earlier summary: {conversation.summary}\n{transcript}"
        request = GenerationRequest(
            model=spec, owner=conversation.user,
            sampling=SamplingParams(temperature=0, max_tokens=SUMMARY_TOKENS, repeat_penalty=1.1),
            messages=[{"role": "user", "content": "Summarise this conversation in at most three sentences, "
                                                  f"keeping names, numbers and decisions:\n\n{transcript[-8000:]}"}])
        return self.engine.submit(request).text().strip()


ROLES = ("system", "user", "assistant")


def _last_question(conversation: Conversation | None) -> tuple[Turn, int]:
    """For a regeneration: the last question as the model read it (the path now ends before it) and its id."""
    turns = conversation.turns if conversation is not None else []
    if len(turns) < 2 or turns[-2].role != "user":
        raise BadRequest("There is no answer to regenerate in this conversation yet.")
    question = turns[-2]
    _truncate(conversation, len(turns) - 2)
    return question, question.message_id


def _branch_before(conversation: Conversation | None, message_id: int) -> int | None:
    """For an edit: the path now ends before that question; returns the message the new question follows."""
    turns = conversation.turns if conversation is not None else []
    index = next((i for i, turn in enumerate(turns) if turn.message_id == message_id and turn.role == "user"), None)
    if index is None:
        raise BadRequest(f"Message {message_id} is not one of this conversation's questions.")
    _truncate(conversation, index)
    return turns[index - 1].message_id if index else None


def _truncate(conversation: Conversation, length: int) -> None:
    """Keep the first ``length`` turns; a summary of trimmed turns that are no longer on the path goes too."""
    conversation.turns = conversation.turns[:length]
    if conversation.first_kept > length:
        conversation.first_kept, conversation.summary = length, ""


def with_system_prompt(messages: list[dict], personality: Personality, tools: ToolUse | None) -> list[dict]:
    """Client-held history as the model reads it: the personality's system prompt first unless the client brought
    its own, and the description of the offered tools appended to the system prompt."""
    messages = [dict(message) for message in messages]
    if not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": personality.system_prompt})
    if tools is not None:
        system = next(message for message in messages if message["role"] == "system")
        system["content"] = f"{system['content']}\n\n{tools.system_text()}".lstrip()
    return messages


def message_text(message: Any, index: int) -> dict[str, str]:
    """One chat message as {role, content}; content may be a string or OpenAI's list of text parts."""
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{index}] must be an object.", param=f"messages[{index}]")
    role = "system" if message.get("role") == "developer" else message.get("role")
    if role not in ROLES:
        raise BadRequest(f"messages[{index}].role must be one of {', '.join(ROLES)}.", param=f"messages[{index}].role")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise BadRequest(f"messages[{index}].content: only text parts are supported.",
                             param=f"messages[{index}].content")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{index}].content must be a string.", param=f"messages[{index}].content")
    return {"role": role, "content": content, **_tool_marks(message, index)}


def _tool_marks(message: dict, index: int) -> dict[str, list]:
    """Tool use the API layer marked on a message (``calls``: (name, arguments, id) on an assistant turn;
    ``results``: (id, text) on a user turn; an id may be ""); ``llm.engine.tools.model_history`` writes them in the
    model's format."""
    marks = {key: message[key] for key in ("calls", "results") if message.get(key)}
    shapes = {"calls": 3, "results": 2}
    well_formed = all(isinstance(value, list) and all(
        isinstance(item, (list, tuple)) and len(item) == shapes[key] and all(isinstance(part, str) for part in item)
        for item in value) for key, value in marks.items())
    if not well_formed:
        raise BadRequest(f"messages[{index}]: malformed tool calls or results.", param=f"messages[{index}]")
    return marks
