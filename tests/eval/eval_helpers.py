"""Helpers shared by the evaluation tests (hand-written rows in the official layout)."""

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def official_row(user: str, gold, **extra) -> dict:
    rm = {"ground_truth": gold, "style": "rule", **extra}
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "reward_model": rm}


def mcq_user(question: str, options: list[str]) -> str:
    letters = "ABCDEFGHIJ"
    body = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n\nChoices:\n{body}\n\nPlease answer with the single correct option letter (e.g., A)."
