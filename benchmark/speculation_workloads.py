"""Prompts of `tgserve benchmark speculation`: input-grounded work, whose answer copies its prompt, and
open-ended chat, whose answer does not.

Input-grounded (issue 13's targets): rewrite or extend code that is in the prompt, answer by quoting a
given document, reformat JSON. N-gram proposals (prompt lookup) find their guesses in the prompt, so
these are where speculation should pay most. Open-ended chat has little to copy: there speculation
must cost nothing (adaptive lengths fall to zero). Each prompt is one user message, rendered with the
checkpoint's chat template (plain "User: ... Assistant:" text where it has none).
"""
from __future__ import annotations

_CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)


def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value
'''

_CLASS = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        """Add `count` units of `name`."""
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        """Remove `count` units of `name`; never below zero."""
        self.items[name] = max(0, self.items.get(name, 0) - count)

    def count(self, name):
        """Units of `name` held."""
        return self.items.get(name, 0)
'''

_DOCUMENT = ("The Harbour Library opens at 9 a.m. on weekdays and at 10 a.m. on Saturdays; it is closed on "
             "Sundays and public holidays. Members may borrow up to eight books at a time for three weeks, and a "
             "loan may be renewed twice unless another member has reserved the book. Overdue books cost 20 cents "
             "per day, up to a maximum of 5 dollars per book. The reading room on the second floor is reserved "
             "for quiet study, and laptops may be used there only with the sound switched off. Children under "
             "twelve must be accompanied by an adult after 6 p.m. The library's printers cost 10 cents per "
             "black-and-white page and 50 cents per colour page, paid at the front desk.")

_JSON = ('{"orders": [{"id": 1041, "customer": "Ada Park", "items": [{"sku": "PEN-01", "qty": 3, "price": 1.5}, '
         '{"sku": "NOTE-A5", "qty": 1, "price": 4.25}], "status": "shipped"}, {"id": 1042, "customer": '
         '"Ben Ortiz", "items": [{"sku": "INK-BLK", "qty": 2, "price": 7.0}], "status": "pending"}, '
         '{"id": 1043, "customer": "Chen Li", "items": [{"sku": "PEN-01", "qty": 10, "price": 1.5}, '
         '{"sku": "CLIP-S", "qty": 100, "price": 0.02}], "status": "pending"}]}')

_CSV = ("city,country,population,area_km2\nLisbon,Portugal,545000,100\nPorto,Portugal,232000,41\n"
        "Seville,Spain,684000,140\nValencia,Spain,792000,135\nLyon,France,522000,48\nNantes,France,320000,65\n")

INPUT_GROUNDED = (
    f"Rewrite these functions with type hints and a one-line docstring each. Keep the bodies as they are.\n\n{_CODE}",
    f"Add a method `set(self, name, count)` and a method `names(self)` to this class, in the same style, and "
    f"show the whole class.\n\n{_CLASS}",
    f"Answer by quoting the exact sentences of the document that answer the questions.\n\nDocument: {_DOCUMENT}\n\n"
    "Questions: When does the library open on Saturdays? How many books may a member borrow, and for how long? "
    "What does printing cost?",
    f"Reformat this JSON with an indent of 2 spaces, one key per line, keys in the same order.\n\n{_JSON}",
    f"Rewrite this JSON as YAML, keeping every field and value.\n\n{_JSON}",
    f"Turn this CSV into a Markdown table with the same columns and rows.\n\n{_CSV}",
)

OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a ten-year-old why the sky is blue and sunsets are red.",
    "What are the pros and cons of working from home? Give your own view at the end.",
    "I want to start running. How should I plan my first two months?",
    "Write a poem about the first snow of winter in a small town.",
    "Suggest a plan for a rainy Sunday with two children, from breakfast to bedtime.",
)

WORKLOADS = {"input-grounded": INPUT_GROUNDED, "open-ended": OPEN_ENDED}


def render(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn of the checkpoint's chat template, ready for the assistant's answer."""
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template is None:
        return f"User: {prompt}\nAssistant:"
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def workload_ids(tokenizer, names: tuple[str, ...]) -> dict[str, list[list[int]]]:
    """Token ids of each named workload's prompts (a tgserve `Tokenizer`; templated text already spells
    its special tokens out, as the chat route encodes it). Raises ValueError for an unknown name."""
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    is_plain = tokenizer.chat_template is None  # plain text gets BOS and friends from the tokenizer
    return {name: [tokenizer.encode(render(tokenizer, p), add_special_tokens=is_plain) for p in WORKLOADS[name]]
            for name in names}
