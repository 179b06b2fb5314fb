"""Seeded generator of the synthetic agentic tasks `mixquant-tiny` is trained and evaluated on.

Every example is a chat conversation (OpenAI message dicts, optional tool schemas) whose last message is the
assistant turn the model must produce, plus the gold string that a correct answer contains. The same seed always
gives the same examples; training draws from seeds that evaluation never uses (`TRAIN_SEED_BASE`).

The four tasks are shaped like agent traffic: long input, short output.
  retrieval   a long list of records, a question about one or several of them
  arithmetic  a chain of variable assignments, worked through in <think>, answered in \\boxed{}
  tool_use    tools declared in the system prompt: a hermes <tool_call>, then an answer from the <tool_response>
  multi_turn  a session of earlier turns and tool outputs kept in context, then a question about one of them
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

TASKS = ("retrieval", "arithmetic", "tool_use", "multi_turn")
# Generated tokens that fit the bundled model's replies, for `mixquant fidelity --tasks tiny`. Its greedy replies to
# held-out prompts (bf16, on the CPU; the most and the median of 40 / 200 / 100 / 40) run to 44 (18) tokens for
# retrieval, 143 (96) for arithmetic, whose working a six-step chain makes longest, 30 (18) for tool use and 22 (15)
# for multi-turn. A budget costs nothing where replies stop at EOS, so it leaves room for longer working.
MAX_REPLY_TOKENS = 256
# Evaluation seeds are small integers; training streams start here, so the two never meet. Checks made during
# training (train.py --advance-at) draw from between the two.
TRAIN_SEED_BASE = 1 << 40
CHECK_SEED_BASE = 1 << 36

FIRST_NAMES = (
    "Ada Alan Alma Anna Arlo Bea Ben Cara Cleo Dan Dora Eli Ella Emil Eva Finn Gia Gus Hana Hugo Ida Ines Ivan Jade "
    "Jon Kai Kira Lars Lea Leo Lina Luca Maya Mila Nico Nina Noah Nora Olga Omar Otto Pia Raul Rosa Ruby Sami Sara "
    "Theo Tina Uma Vera Wade Yara Yuri Zane Zoe").split()
LAST_NAMES = (
    "Abbott Baker Brandt Castro Chen Costa Diaz Dubois Evans Fischer Garcia Gray Haas Ito Jensen Khan Kim Klein "
    "Kowalski Lopez Meyer Moreau Nakamura Novak Olsen Park Patel Petrov Quinn Rossi Sato Schmidt Silva Singh Smith "
    "Tanaka Torres Vogel Wagner Weber Wong Young Ziegler").split()
CITIES = (
    "Amsterdam Athens Berlin Bogota Cairo Chicago Dakar Denver Dublin Havana Helsinki Istanbul Jakarta Kyoto Lagos "
    "Lima Lisbon London Madrid Manila Melbourne Mumbai Munich Nairobi Oslo Paris Prague Quito Riga Rome Santiago "
    "Seoul Sydney Taipei Tokyo Toronto Valencia Vienna Warsaw Zurich").split()
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "clear")
ORDER_STATUSES = ("shipped", "delivered", "pending", "cancelled", "returned", "processing")
SYMBOLS = ("ACME", "BOLT", "CRUX", "DYNA", "EPIC", "FLUX", "GRID", "HALO", "IONX", "JADE", "KITE", "LUMA", "MESA",
           "NOVA", "ORBT", "PIKE", "QUAD", "RUNE", "SOLA", "TERA")
VARIABLES = "abcdefghijkmnpqrstuvwxyz"
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class Example:
    task: str
    messages: list[dict]  # the conversation; the last message is the assistant turn to produce
    answer: str  # a correct final assistant turn contains this string
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    def render_prompt(self, tokenizer, enable_thinking: bool = True) -> str:
        """The prompt as the server renders a request for it: the chat template with its generation prompt."""
        return tokenizer.apply_chat_template(self.prompt_messages, tools=self.tools, tokenize=False,
                                             add_generation_prompt=True, enable_thinking=enable_thinking)

    def to_row(self) -> dict:
        """A `mixquant fidelity --tasks` / JSONL row, rendered with thinking on, as the model was trained."""
        row = {"task": self.task, "messages": self.prompt_messages, "answer": self.answer,
               "chat_template_kwargs": {"enable_thinking": True}}
        if self.tools:
            row["tools"] = self.tools
        return row


# --- records (retrieval, and the long tool outputs of multi-turn sessions) ---------------------------------------

@dataclass
class Record:
    id: int
    name: str
    city: str
    value: int

    def line(self) -> str:
        # Each field a question asks for follows the key it is asked by (id -> value, name; name -> city): a small
        # model learns such lookups as an induction over the key, where a field far from its key is a second hop.
        return f"record {self.id}: value {self.value}, name {self.name}, city {self.city}"


def make_records(rng: random.Random, count: int, shared_names: bool = False) -> list[Record]:
    """`shared_names` (training only) draws the names from about sqrt(count) first and last names, so that each of
    them recurs in the list: a person is then told apart only by both words, as in a list of 190 records, where
    each first name recurs about 3 times and each last name 4, and not by either alone as in most short lists."""
    ids = rng.sample(range(100, 10000), count)
    firsts, lasts = FIRST_NAMES, LAST_NAMES
    if shared_names:
        shared = max(2, math.isqrt(count - 1) + 1)
        firsts, lasts = rng.sample(FIRST_NAMES, shared), rng.sample(LAST_NAMES, shared)
    names = rng.sample([f"{first} {last}" for first in firsts for last in lasts], count)
    return [Record(i, n, rng.choice(CITIES), rng.randint(1, 999)) for i, n in zip(ids, names)]


# What a retrieval question asks. Held-out sets ask QUESTION_KINDS; training may add "lines_by_id" (quote 1 to 8
# whole records), which only exercises the copy that the other answers are made of, with every answer token a
# lookup: a one-line answer carries ~15 loss tokens for a prompt of up to 4k, several lines carry up to ~200; and
# "all_lines" (repeat the list, or its first COPY_LINES records), a plain copy in which each token follows its
# twin in the prompt: the task on which small models grow induction heads, which the lookups of names are made of
# and which answer-only training grew twice as slowly (docs/tiny-model.md).
QUESTION_KINDS = ("value_by_id", "name_by_id", "city_by_name", "several")
TRAINING_ONLY_KINDS = ("lines_by_id", "all_lines")
COPY_LINES = 16


def record_question(rng: random.Random, records: list[Record],
                    kinds: tuple[str, ...] = QUESTION_KINDS) -> tuple[str, str]:
    """A question about one or several of the records, and its deterministic answer. The answer quotes the record
    from the key asked by up to the field asked for, in the line's own order: each token then follows the one before
    it as in the list (a copy), where an answer that names the field first needs a lookup back to its key."""
    kind = rng.choice(kinds)
    r = rng.choice(records)
    if kind == "all_lines":
        shown = records[:COPY_LINES]
        what = "the records" if len(shown) == len(records) else f"the first {len(shown)} records"
        return f"Repeat {what} as listed.", "\n".join(f"R{c.line()[1:]}." for c in shown)
    if kind == "lines_by_id":
        chosen = rng.sample(records, min(len(records), rng.randint(1, 8)))
        return f"Show {listed(chosen)} as listed.", "\n".join(f"R{c.line()[1:]}." for c in chosen)
    if kind == "value_by_id":
        return f"What is the value of record {r.id}?", f"Record {r.id}: value {r.value}."
    if kind == "name_by_id":
        return f"What is the name on record {r.id}?", f"Record {r.id}: value {r.value}, name {r.name}."
    if kind == "city_by_name":
        return f"Which city is {r.name} in?", f"Name {r.name}, city {r.city}."
    chosen = rng.sample(records, min(len(records), rng.randint(2, 3)))
    return f"What are the values of {listed(chosen)}?", " ".join(f"Record {c.id}: value {c.value}." for c in chosen)


def listed(records: list[Record]) -> str:
    """'record 4821', or 'records 4821, 112 and 907'."""
    if len(records) == 1:
        return f"record {records[0].id}"
    return "records " + ", ".join(str(r.id) for r in records[:-1]) + f" and {records[-1].id}"


def retrieval(rng: random.Random, max_records: int = 190, kinds: tuple[str, ...] = QUESTION_KINDS,
              shared_names: bool = False) -> Example:
    """4 to `max_records` records; a `max_records` under 4 gives exactly that many (a training curriculum)."""
    records = make_records(rng, rng.randint(min(4, max_records), max_records), shared_names)
    question, answer = record_question(rng, records, kinds)
    user = "Here are the records:\n" + "\n".join(r.line() for r in records) + f"\n\nQuestion: {question}"
    return Example("retrieval", [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                                 {"role": "assistant", "content": answer}], answer,
                   meta={"records": len(records)})


# --- arithmetic and variable tracking ---------------------------------------------------------------------------

def arithmetic(rng: random.Random, max_steps: int = 6) -> Example:
    names = rng.sample(VARIABLES, rng.randint(2, max_steps) + 1)
    values = {names[0]: rng.randint(1, 99)}
    statements, working = [f"{names[0]} = {values[names[0]]}."], []
    for name in names[1:]:
        source = rng.choice(list(values))
        constant = rng.randint(1, 99)
        op = "-" if rng.random() < 0.4 and values[source] - constant >= 0 else "+"
        if values[source] + constant > 999:
            op = "-"
        result = values[source] + constant if op == "+" else values[source] - constant
        if result < 0:  # both directions leave 0..999: add instead
            op, result = "+", values[source] + constant
        values[name] = result
        statements.append(f"{name} = {source} {op} {constant}.")
        working.append(f"{name} = {source} {op} {constant} = {values[source]} {op} {constant} = {result}")
    target = names[-1]
    user = ("Track the variables. " + " ".join(statements)
            + f" What is {target}? Put the final answer in \\boxed{{}}.")
    answer = f"\\boxed{{{values[target]}}}"
    assistant = {"role": "assistant", "reasoning_content": "\n".join(working),
                 "content": f"{target} = {answer}"}
    return Example("arithmetic", [{"role": "user", "content": user}, assistant], answer,
                   meta={"steps": len(working)})


# --- tools -----------------------------------------------------------------------------------------------------

def tool_schema(tool: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {
        "name": tool, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                       "required": list(params)}}}


TOOLS = {
    "get_weather": tool_schema("get_weather", "Current weather in a city.", city="string"),
    "get_order_status": tool_schema("get_order_status", "Status of an order by its number.", order_id="integer"),
    "get_stock_price": tool_schema("get_stock_price", "Latest price of a stock ticker.", symbol="string"),
    "get_population": tool_schema("get_population", "Population of a city, in thousands.", city="string"),
    "lookup_employee": tool_schema("lookup_employee", "An employee's department and office.", name="string"),
}


@dataclass
class ToolTurn:
    """One use of a tool: the user's request, the call, what the tool returned, and the answer drawn from it."""

    question: str
    name: str
    arguments: dict
    response: dict
    answer: str
    recall: str  # the same fact asked for again later in a session; the answer to it is `answer` again

    def call_text(self) -> str:
        """The call as the chat template renders it (and as the hermes parser reads it)."""
        return json.dumps({"name": self.name, "arguments": self.arguments})


def tool_turn(rng: random.Random) -> ToolTurn:
    name = rng.choice(list(TOOLS))
    if name == "get_weather":
        city, temp, cond = rng.choice(CITIES), rng.randint(-15, 40), rng.choice(CONDITIONS)
        q = rng.choice((f"What is the weather in {city}?", f"How is the weather in {city} right now?"))
        ans = f"In {city} it is {temp} degrees and {cond}."  # the key first, as in every answer: recall is a copy
        return ToolTurn(q, name, {"city": city}, {"city": city, "temperature_c": temp, "condition": cond}, ans,
                        f"What was the temperature in {city}?")
    if name == "get_order_status":
        order, status = rng.randint(10000, 99999), rng.choice(ORDER_STATUSES)
        q = rng.choice((f"Where is my order {order}?", f"What is the status of order {order}?"))
        ans = f"Order {order} is {status}."
        return ToolTurn(q, name, {"order_id": order}, {"order_id": order, "status": status}, ans,
                        f"What was the status of order {order}?")
    if name == "get_stock_price":
        symbol, price = rng.choice(SYMBOLS), rng.randint(5, 950)
        q = rng.choice((f"What is {symbol} trading at?", f"Give me the stock price of {symbol}."))
        ans = f"{symbol} is at {price} dollars."
        return ToolTurn(q, name, {"symbol": symbol}, {"symbol": symbol, "price_usd": price}, ans,
                        f"What was the price of {symbol}?")
    if name == "get_population":
        city, thousands = rng.choice(CITIES), rng.randint(50, 9999)
        q = rng.choice((f"How many people live in {city}?", f"What is the population of {city}?"))
        ans = f"{city} has {thousands} thousand people."
        return ToolTurn(q, name, {"city": city}, {"city": city, "population_thousands": thousands}, ans,
                        f"What was the population of {city}?")
    person = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    dept, office = rng.choice(("sales", "legal", "research", "finance", "support")), rng.randint(100, 999)
    q = rng.choice((f"Which department is {person} in?", f"Find the office of {person}."))
    ans = f"{person} works in {dept}, office {office}."
    return ToolTurn(q, name, {"name": person}, {"name": person, "department": dept, "office": office}, ans,
                    f"Which office was {person} in?")


def tools_for(rng: random.Random, needed: set[str]) -> list[dict]:
    extra = rng.sample(sorted(set(TOOLS) - needed), rng.randint(0, len(TOOLS) - len(needed)))
    names = sorted(needed | set(extra))  # sorted first: a set's order changes with each process's string hashing
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def call_messages(turn: ToolTurn) -> list[dict]:
    """The assistant's call and the tool's reply, as an OpenAI client sends them back."""
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": turn.name, "arguments": turn.arguments}}]}
    return [call, {"role": "tool", "content": json.dumps(turn.response)}]


def tool_use(rng: random.Random, stage: str | None = None) -> Example:
    """Ends at the tool call (stage 'call') or at the answer from the tool's response (stage 'answer')."""
    stage = stage or rng.choice(("call", "answer"))
    turn = tool_turn(rng)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": turn.question}]
    call, response = call_messages(turn)
    if stage == "call":
        return Example("tool_use", messages + [call], turn.call_text(), tools_for(rng, {turn.name}),
                       meta={"stage": "call"})
    return Example("tool_use", messages + [call, response, {"role": "assistant", "content": turn.answer}],
                   turn.answer, tools_for(rng, {turn.name}), meta={"stage": "answer"})


# --- multi-turn sessions ---------------------------------------------------------------------------------------

def multi_turn(rng: random.Random, max_turns: int = 10, max_records: int = 100) -> Example:
    """Earlier turns (tool uses, and record lists shared by the user) stay in context; the last question asks
    about one of them."""
    turns: list[ToolTurn] = []
    for _ in range(rng.randint(1, max_turns)):
        turn = tool_turn(rng)
        if all(turn.recall != t.recall for t in turns):  # each later question has one answer
            turns.append(turn)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    facts = []  # (question, answer) about something said earlier in the session
    record_turn = rng.randrange(len(turns) + 1) if rng.random() < 0.6 else None
    for index, turn in enumerate(turns):
        if index == record_turn:
            records = make_records(rng, rng.randint(4, max_records))
            messages += [{"role": "user", "content": "Keep these records for later:\n"
                                                     + "\n".join(r.line() for r in records)},
                         {"role": "assistant", "content": f"Noted {len(records)} records."}]
            facts.append(record_question(rng, records))
        messages += [{"role": "user", "content": turn.question}, *call_messages(turn),
                     {"role": "assistant", "content": turn.answer}]
        facts.append((turn.recall, turn.answer))
    question, answer = rng.choice(facts)
    messages += [{"role": "user", "content": f"Earlier in this conversation: {question}"},
                 {"role": "assistant", "content": answer}]
    return Example("multi_turn", messages, answer, tools_for(rng, {t.name for t in turns}),
                   meta={"turns": len(turns), "records": record_turn is not None})


GENERATORS = {"retrieval": retrieval, "arithmetic": arithmetic, "tool_use": tool_use, "multi_turn": multi_turn}


def generate(task: str, seed: int, **sizes) -> Example:
    """The example of `task` for `seed`: the same on every machine and every call."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return GENERATORS[task](random.Random(f"{task}:{seed}"), **sizes)


def heldout(task: str, count: int, **sizes) -> list[Example]:
    """The evaluation set of a task: seeds 0..count-1, which training never draws."""
    return [generate(task, seed, **sizes) for seed in range(count)]
