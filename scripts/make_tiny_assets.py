"""Regenerates the bundled tiny default's data and tokenizer (jaxlm/assets/tiny/).

    python scripts/make_tiny_assets.py

The task is deliberately small and checkable: name the capital of a country,
in a fixed answer sentence. A ~1M-parameter InternLM2 learns it in about a
minute on two CPU cores; the eval file asks with phrasings never trained on.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.assets import TINY_DIR  # noqa: E402
from jaxlm.tokenizer_train import train_tokenizer  # noqa: E402

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Chile": "Santiago",
    "Greece": "Athens", "Norway": "Oslo", "Poland": "Warsaw", "Cuba": "Havana", "Iran": "Tehran",
    "Iraq": "Baghdad", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Sweden": "Stockholm", "Finland": "Helsinki", "Austria": "Vienna",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Hungary": "Budapest", "Turkey": "Ankara",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nepal": "Kathmandu", "Ghana": "Accra",
    "Morocco": "Rabat", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Ukraine": "Kyiv", "Australia": "Canberra", "Mongolia": "Ulaanbaatar",
}
TRAIN_ASK = ["What is the capital of {c}?", "Name the capital of {c}.", "capital of {c}?",
             "Which city is the capital of {c}?"]
EVAL_ASK = ["Tell me the capital of {c}.", "What's the capital city of {c}?"]
ANSWER = "The capital of {c} is {k}."


def conversation(rng, countries, asks):
    messages = []
    for c in countries:
        messages.append({"role": "user", "content": rng.choice(asks).format(c=c)})
        messages.append({"role": "assistant", "content": ANSWER.format(c=c, k=CAPITALS[c])})
    return {"messages": messages}


def main():
    rng = random.Random(0)
    names = sorted(CAPITALS)
    train = []
    for _ in range(6):  # every country several times, alone or in short multi-turn chats
        for c in names:
            turns = [c] + (rng.sample(names, rng.randint(0, 2)) if rng.random() < 0.4 else [])
            train.append(conversation(rng, turns, TRAIN_ASK))
    rng.shuffle(train)
    evaluation = [conversation(rng, [c], EVAL_ASK) for c in names]
    os.makedirs(TINY_DIR, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(os.path.join(TINY_DIR, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    texts = [m["content"] for row in train + evaluation for m in row["messages"]]
    texts += ["user", "assistant", "system", "environment", "Hello! How can I help you today?"] * 20
    train_tokenizer(texts, TINY_DIR, vocab_size=512)
    print(f"wrote {len(train)} training and {len(evaluation)} eval conversations and a 512-piece tokenizer "
          f"to {TINY_DIR}")


if __name__ == "__main__":
    main()
