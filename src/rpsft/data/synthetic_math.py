"""The project's own offline data: multi-step arithmetic word problems with worked solutions.

Each problem is a short story of quantity changes (buy, give away, share equally, multiply into boxes, ...): 2-4 by
default, any range within 1-8 with ``ops``.
The solution walks through every step with its arithmetic and ends in ``\\boxed{N}``, the format the math judge
reads. Generation is deterministic in ``seed``; train and test never share a question.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..fileio import write_jsonl

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vik", "Wren", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "coins", "cards", "shells",
         "beads", "plums", "crayons", "tickets", "buttons"]
PROMPT_SUFFIX = "Solve step by step and put the final answer in \\boxed{}."


def _step(rng: random.Random, name: str, item: str, x: int) -> tuple[str, str, int] | None:
    """One story sentence, its worked line, and the new quantity (None if no operation fits x)."""
    kind = rng.choice(["add", "sub", "mul", "div", "add"])
    if kind == "add":
        a = rng.randint(2, 40)
        verb = rng.choice([f"buys {a} more {item}", f"finds {a} more {item}", f"is given {a} {item}"])
        return f"Then {name} {verb}.", f"After that, {name} has {x} + {a} = {x + a} {item}.", x + a
    if kind == "sub" and x > 2:
        a = rng.randint(1, x - 1)
        verb = rng.choice([f"gives away {a} {item}", f"loses {a} {item}", f"uses {a} {item}"])
        return f"Then {name} {verb}.", f"After that, {name} has {x} - {a} = {x - a} {item}.", x - a
    if kind == "mul" and x <= 60:
        a = rng.randint(2, 5)
        text = f"Then {name} gets enough {item} to have {a} times as many."
        return text, f"{a} times as many is {x} × {a} = {x * a} {item}.", x * a
    if kind == "div":
        divisors = [d for d in range(2, 10) if x % d == 0 and x // d >= 1]
        if divisors:
            d = rng.choice(divisors)
            text = f"Then {name} shares them equally among {d} friends and keeps one share."
            return text, f"One share is {x} ÷ {d} = {x // d} {item}.", x // d
    return None


def make_problem(rng: random.Random, ops: tuple[int, int] = (2, 4)) -> dict:
    """One problem with ``ops[0]``..``ops[1]`` quantity changes (uniform)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(3, 60)
    story = [f"{name} has {x} {item}."]
    work = [f"{name} starts with {x} {item}."]
    n_steps = rng.randint(*ops)
    while len(story) - 1 < n_steps:
        s = _step(rng, name, item, x)
        if s is None:
            continue
        story.append(s[0])
        work.append(s[1])
        x = s[2]
    question = " ".join(story) + f" How many {item} does {name} have now?"
    solution = "\n".join(work) + f"\nThe answer is $\\boxed{{{x}}}$."
    return {
        "prompt": [{"role": "user", "content": f"{question}\n{PROMPT_SUFFIX}"}],
        "completion": [{"role": "assistant", "content": solution}],
        "answer": str(x),
    }


def parse_ops(spec: str | tuple[int, int]) -> tuple[int, int]:
    """``"2-4"``, ``"1"`` or a (lo, hi) pair -> (lo, hi), checked: 1 <= lo <= hi <= 8."""
    if isinstance(spec, str):
        parts = spec.replace(" ", "").split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if 1 <= len(parts) <= 2 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
    else:
        lo, hi = spec
    if not 1 <= lo <= hi <= 8:
        raise ValueError(f"--ops {spec}: give the number of quantity changes per problem as N or LO-HI with "
                         f"1 <= LO <= HI <= 8 (default 2-4)")
    return lo, hi


def generate(n: int, seed: int = 0, exclude: set[str] | None = None, ops: str | tuple[int, int] = (2, 4)) -> list[dict]:
    ops = parse_ops(ops)
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p = make_problem(rng, ops)
        q = p["prompt"][0]["content"]
        if q in seen:
            continue
        seen.add(q)
        out.append(p)
    return out


def write_splits(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                 ops: str | tuple[int, int] = (2, 4)) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint questions) into ``out_dir``; returns their paths.
    ``ops`` sets the quantity changes per problem (``"1-2"``: short solutions, see :func:`parse_ops`)."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    rows = generate(n_train + n_test, seed=seed, ops=ops)
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    write_jsonl(paths["train"], rows[:n_train])
    write_jsonl(paths["test"], rows[n_train:])
    return paths
