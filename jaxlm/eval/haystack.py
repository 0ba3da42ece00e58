"""Building long prompts of an exact token length with a fact hidden at a given depth.

The filler is generated (not copied from any corpus): plain sentences in a
fixed, seeded order. Lengths are counted with the model's own tokenizer; the
filler is cut word by word (binary search) so a prompt lands within 1% of
the requested length, and the needle goes in at the requested fraction of
the filler.
"""

from __future__ import annotations

import dataclasses
import random

_SUBJECTS = ["The river", "An old library", "The morning train", "A quiet garden", "The harbor",
             "A mountain road", "The market square", "An autumn forest", "The city museum", "A small bakery",
             "The northern lake", "A busy workshop", "The village school", "A winter field", "The lighthouse"]
_VERBS = ["was described by travellers as", "seemed to many visitors", "had always been", "became known as",
          "was remembered as", "turned out to be", "was often called", "looked, in the evening light,"]
_OBJECTS = ["calm and full of small sounds", "a place where time moved slowly", "busier than anyone expected",
            "a good spot for long conversations", "older than the records suggest", "bright after the rain",
            "a landmark for people passing through", "surprisingly cold at night", "worth a second visit",
            "the subject of many paintings"]


def filler_words(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < count:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        words.extend(sentence.split())
    return words[:count]


@dataclasses.dataclass
class Prompt:
    text: str
    ids: list[int]
    needle_token: int      # index of the needle's first token in ids
    depth: float           # achieved depth in the filler: filler tokens before the needle / all filler tokens
    answer: str


def build(tokenizer, target_tokens: int, depth_percent: float, needle: str, question: str, answer: str,
          *, intro: str = "", chat: bool = True, seed: int = 0) -> Prompt:
    """A prompt of ``target_tokens`` (+-1%) with ``needle`` at ``depth_percent`` of the filler."""
    def count(user_text: str) -> int:
        """Tokens of the prompt up to the end of ``user_text`` (a prefix of the user message)."""
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=False)
            return len(tokenizer.encode(text[: len(text) - len("<|im_end|>\n")], add_special_tokens=False))
        return len(tokenizer.encode(user_text))

    def render(n_words: int):
        words = filler_words(n_words, seed)
        cut = round(len(words) * depth_percent / 100)
        before, after = " ".join(words[:cut]), " ".join(words[cut:])
        context = " ".join(p for p in (before, needle, after) if p)
        body = f"{intro}{context}\n\n{question}"
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text, ids = body, tokenizer.encode(body)
        return text, ids, before, context

    lo, hi = 0, max(16, target_tokens)
    while len(render(hi)[1]) < target_tokens:
        hi *= 2
    while lo < hi:  # the largest filler whose prompt fits the target
        mid = (lo + hi + 1) // 2
        if len(render(mid)[1]) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    text, ids, before, context = render(lo)
    start = count(intro)
    needle_at = count(f"{intro}{before} ".rstrip() + (" " if before else "")) if before else start
    end = count(f"{intro}{context}")
    needle_len = count(f"{intro}{needle}") - start
    filler = max(end - start - needle_len, 1)
    return Prompt(text, ids, needle_at, (needle_at - start) / filler, answer)


def needle_case(rng: random.Random):
    city = rng.choice(["Lisbon", "Quito", "Hanoi", "Oslo", "Lima", "Accra", "Perth", "Riga", "Sofia", "Tunis"])
    number = str(rng.randint(1000000, 9999999))
    needle = f"The special magic number for {city} is {number}."
    question = f"What is the special magic number for {city}? Answer with the number only."
    return needle, question, number


def passkey_case(rng: random.Random):
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? Answer with the pass key only."
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n\n")
    return needle, question, key, intro
