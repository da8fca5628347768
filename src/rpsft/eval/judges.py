"""Judges: turn one completion into a verdict. Only the completion is ever read, never the prompt (the official
prompts end in "(e.g., A)" and restate the boxed instruction, so any extraction that saw the prompt would grade
the question instead of the answer).

* math: the last ``\\boxed{}`` of the completion, compared with the gold answer by ``math-verify`` (gold first:
  ``verify`` is asymmetric). Every math-verify phase runs under a timeout, so a pathological answer (a 10^6-digit
  power, a nested radical sympy cannot simplify) costs at most a few seconds and is graded wrong, never hangs.
  Around math-verify (:func:`normalize_answer`): unit words after a number are dropped (``5 dollars`` -> 5), an
  AMC-style choice with its value keeps the value (``\\textbf{(B)}\\ 12`` -> 12), digits separated by a space
  stay separate numbers (``1 2`` is not 12; ``12 000`` with three-digit groups is 12000), an inequality and an
  interval compare as sets (``2 < x \\le 5`` = ``(2, 5]``), and a decimal must match to a relative tolerance of
  ``NUMERIC_RTOL`` (1e-9) instead of math-verify's rounding to 6 decimals (under which 0.5000001 = 0.5).
* multiple choice: a letter from the completion (boxed first, then "answer is X" style phrases, then a bare
  letter), restricted to the options that exist.
* IFEval: ``if-verifiable``'s checkers, loose mode (the paper's IFEval-loose: a prompt passes when every
  instruction passes on some loose transformation of the response).
"""

from __future__ import annotations

import atexit
import logging
import math
import re
import string
import threading
from typing import Any

LETTERS = string.ascii_uppercase

# --------------------------------------------------------------------------------------------------- boxed


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """``text[start] == '{'``: return (content, index after the closing brace), or None if never closed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue  # an escaped brace \{ or \} is content, not structure
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    Nested braces are handled (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). A box left open by truncation is
    skipped in favour of the last complete one; no box at all gives None."""
    if not text:
        return None
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _balanced(text, j)
            if got is not None:
                return got[0].strip()
        elif j > m.end() and j < len(text):  # "\boxed 5": the argument is the next token
            tok = re.match(r"[^\s$.,;]+", text[j:])
            if tok:
                return tok.group(0)
    return None


# ---------------------------------------------------------------------------------------------------- math

def _gold_str(gold: Any) -> str:
    """Gold answers come as str, int (AMC) or a one-element list (OlympiadBench); several -> comma-joined."""
    if isinstance(gold, (list, tuple)):
        return ", ".join(_gold_str(g) for g in gold)
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    return str(gold).strip()


def _strip_dollars(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def _plain(s: str) -> str:
    """Cheap normal form for an exact-match fast path: no spaces, no $, no \\text{}, no trailing period. A space
    between two digits is kept (``1 2`` is two numbers, not 12)."""
    s = _strip_dollars(s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,;:! ]|\\left|\\right", "", s)
    s = re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)
    return s.rstrip(".").replace("dfrac", "frac").replace("tfrac", "frac")


# Relative tolerance for a decimal answer against a number (math-verify alone rounds both to 6 decimals, which
# makes 0.5000001 equal to 0.5 and 1e-7 equal to 2e-7). 1e-9 absorbs binary floating-point error in parsing
# and nothing a model would write; a rounded decimal (0.333333 for 1/3) is a different value and graded wrong.
NUMERIC_RTOL = 1e-9
# Absolute rounding (decimals) math-verify applies to floats inside tuples, intervals and matrices.
FLOAT_ROUNDING = 9

_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_GAP = r"(?:\s|~|\\[ ,;:!]|\\quad)*"
# words that are mathematics, not units: "5 pi" is 5*pi
_MATH_WORDS = {"pi", "inf", "infty", "infinity", "sqrt", "ln", "log", "exp", "sin", "cos", "tan", "sec",
               "csc", "cot", "mod", "and", "or", "to", "times", "cdot", "div"}
_UNIT_RE = re.compile(rf"(?P<num>{_NUMBER}){_GAP}(?:\\(?:text|mathrm|mbox|textnormal)\s*\{{\s*)?"
                      rf"(?P<words>[A-Za-z]{{2,}}(?:\s+[A-Za-z]{{2,}})*)\s*\}}?\s*\.?")
_CHOICE_RE = re.compile(rf"(?:\\(?:textbf|text|mathrm|mathbf)\s*\{{\s*\(?[A-E]\)?\s*\}}|\([A-E]\)){_GAP}")
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.])")


def normalize_answer(s: str) -> str:
    """The normalisation around math-verify (module docstring): an AMC choice letter before a value is dropped,
    a number followed only by unit words becomes the number, space-grouped thousands are joined."""
    s = _strip_dollars(s)
    m = _CHOICE_RE.match(s)
    if m and s[m.end():].strip():
        s = _strip_dollars(s[m.end():])
    m = _UNIT_RE.fullmatch(s.strip())
    if m and not {w.lower() for w in m.group("words").split()} & _MATH_WORDS:
        s = m.group("num")
    return _SPACED_THOUSANDS.sub(lambda t: t.group(0).replace(" ", ""), s)


def _numbers_close(g, p) -> bool | None:
    """For two plain numbers of which one is a decimal: equal within ``NUMERIC_RTOL``; otherwise None (let
    math-verify decide)."""
    from sympy import Float, Number

    if not (isinstance(g, Number) and isinstance(p, Number) and (isinstance(g, Float) or isinstance(p, Float))):
        return None
    if not (g.is_finite and p.is_finite):
        return None
    diff = abs(g - p)
    return bool(diff <= NUMERIC_RTOL * max(abs(g), abs(p)))


def _verify_inline(gold: str, pred: str, timeout_s: int) -> bool:
    from math_verify import parse, verify

    # Both sides are wrapped in \boxed{} so math-verify's boxed extraction (its highest priority) reads exactly
    # the string given, not some other number inside it.
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s)
    if not g:
        return False
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout_s)
    if not p:
        return False
    close = _numbers_close(g[0], p[0])
    if close is not None:
        return close
    # allow_set_relation_comp: an inequality answer for an interval gold (and back) compares as sets
    return bool(verify(g, p, float_rounding=FLOAT_ROUNDING, allow_set_relation_comp=True, timeout_seconds=timeout_s))


# math-verify's timeouts are signal.alarm based and only work in the main thread; elsewhere (a reward function
# called from a worker thread, a web server) we run it in one long-lived child process and kill that on timeout.
_worker_lock = threading.Lock()
_worker = None


def _get_worker():
    global _worker
    if _worker is None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _worker = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        atexit.register(_close_worker)
    return _worker


def _close_worker() -> None:
    global _worker
    if _worker is not None:
        _worker.shutdown(wait=True, cancel_futures=True)
        _worker = None


def _kill_worker() -> None:
    global _worker
    if _worker is not None:
        for p in list(getattr(_worker, "_processes", {}).values()):
            p.kill()
        _worker.shutdown(wait=False, cancel_futures=True)
        _worker = None


def _verify_in_child(gold: str, pred: str, timeout_s: int) -> bool:
    from concurrent.futures import TimeoutError as FutTimeout

    with _worker_lock:
        fut = _get_worker().submit(_verify_inline, gold, pred, timeout_s)
        try:
            # three timed phases (parse gold, parse pred, verify) plus the child's first import of sympy
            return bool(fut.result(timeout=3 * timeout_s + 30))
        except FutTimeout:
            logging.getLogger(__name__).warning("math judge timed out on %r; graded wrong", pred[:80])
            _kill_worker()
            return False
        except Exception:  # noqa: BLE001 - a judge error is a wrong answer, never a crashed run
            return False


def math_equal(gold: Any, pred: str, timeout_s: float = 5.0) -> bool:
    """Is ``pred`` (an extracted answer) equal to ``gold`` for math-verify? Bounded time; errors -> False."""
    gold_s = normalize_answer(_gold_str(gold))
    pred = normalize_answer(pred)
    if not gold_s or not pred:
        return False
    if _plain(gold_s) == _plain(pred):
        return True
    t = max(1, int(math.ceil(timeout_s)))
    if threading.current_thread() is threading.main_thread():
        try:
            return _verify_inline(gold_s, pred, t)
        except Exception:  # noqa: BLE001 - includes math-verify's TimeoutException
            return False
    return _verify_in_child(gold_s, pred, t)


def math_correct(completion: str, gold: Any, timeout_s: float = 5.0) -> bool:
    """Is the last ``\\boxed{}`` of ``completion`` mathematically equal to ``gold``?

    Gold is parsed first (math-verify's ``verify(gold, pred)`` is asymmetric). No box -> False. Never hangs:
    each math-verify phase is bounded by ``timeout_s`` seconds (signal alarm in the main thread, a killable
    child process elsewhere). This is also the RL reward (``rpsft rl``)."""
    pred = extract_boxed(_after_think(completion))
    if pred is None:
        return False
    return math_equal(gold, pred, timeout_s)


_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(completion: str) -> str | None:
    """The last number in the completion (commas dropped): GSM8K's customary "flexible" extraction."""
    nums = _NUM_RE.findall(_after_think(completion or ""))
    if not nums:
        return None
    return nums[-1].replace(",", "").rstrip(".")


def _after_think(text: str) -> str:
    """Reasoning models wrap their scratchpad in <think>...</think>; the answer is what follows."""
    return text.rsplit("</think>", 1)[-1] if text and "</think>" in text else (text or "")


# ---------------------------------------------------------------------------------------- multiple choice

def _clean_box(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return s.replace("$", "").strip().strip("{}").strip()


def mcq_letter(completion: str, n_options: int, labels: str | list[str] | None = None) -> str | None:
    """The option letter the completion commits to, or None. Only letters of existing options count
    (``n_options=4`` -> A-D; ``labels`` for other single-character labels, e.g. ARC's "1234"). Looked for, in
    order: the last ``\\boxed{}``; the last "answer is X" / "Answer: X" / "option X is correct" phrase; a
    completion that is just a letter; a last line (or the first line of a reply of at most two lines)
    starting "X." or "(X)"."""
    if n_options < 1:
        raise ValueError(f"n_options must be >= 1, got {n_options}")
    valid = "".join(labels) if labels else LETTERS[: min(n_options, 26)]
    if any(len(x) != 1 for x in (labels or [])):
        raise ValueError(f"option labels must be single characters, got {labels!r}")
    text = _after_think(completion or "")
    cls = "[" + re.escape(valid) + "]"
    # 1. the box, as the official prompts ask: \boxed{C}, \boxed{(C)}, \boxed{C. Planetary days ...}
    box = extract_boxed(text)
    if box is not None:
        m = re.fullmatch(rf"\(?({cls})\)?(?:[.:)]\s*.*)?", _clean_box(box), flags=re.S)
        if m:
            return m.group(1)
    # 2. explicit commitments; the letter itself is case-sensitive so the article "a" never counts
    phrases = [
        rf"(?i:\banswer)\**(?:\s+(?i:is|would\s+be|should\s+be))?\s*(?:[:=]\s*)?\**\s*"
        rf"(?i:option\s+|choice\s+)?\**\(?({cls})\)?\**(?![A-Za-z0-9])",
        rf"(?i:\b(?:option|choice))\s*\(?({cls})\)?\s+(?i:is\s+(?:the\s+)?correct)",
        rf"(?i:\bcorrect\s+(?:option|choice|answer|letter))\s*(?i:is)?\s*[:=]?\s*\**\(?({cls})\)?\**(?![A-Za-z0-9])",
    ]
    for pat in phrases:
        hits = re.findall(pat, text)
        if hits:
            return hits[-1]
    # 3. the whole completion is a letter: "C", "(C)", "C."
    m = re.fullmatch(rf"\s*\**\(?({cls})\)?[.:)]?\**\s*", text)
    if m:
        return m.group(1)
    # 4. the last line (or the first of a short reply) restates an option: "C. Planetary days ...". A long
    #    reply's first line is more often the start of a walk through the options than a verdict.
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in lines[-1:] + (lines[:1] if len(lines) <= 2 else []):
        m = re.match(rf"\**\(?({cls})(?:\)|\.|:)\**(?:\s|$)", line)
        if m:
            return m.group(1)
    return None


def parse_choices(user_prompt: str) -> list[tuple[str, str]]:
    """``[(label, text)]`` from the official prompt layout: a "Choices:" line, then "A. ..." lines (ARC also
    uses "1. ..."). Labels must run A, B, C... or 1, 2, 3...; an option may continue on following lines."""
    part = user_prompt.rsplit("Choices:", 1)[-1] if "Choices:" in user_prompt else user_prompt
    out: list[tuple[str, str]] = []
    for line in part.splitlines():
        if line.lstrip().startswith("Please answer"):
            break
        m = re.match(r"\s*([A-Z]|[1-9])[.)]\s?(.*)$", line)
        if m:
            label = m.group(1)
            seq = LETTERS if (out[0][0] if out else label) == "A" else "123456789"
            if len(out) < len(seq) and label == seq[len(out)]:
                out.append((label, m.group(2).strip()))
                continue
        if out and line.strip():
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line.strip())
    return out


def mcq_options(user_prompt: str) -> list[str]:
    """Option texts of :func:`parse_choices`."""
    return [t for _, t in parse_choices(user_prompt)]


# -------------------------------------------------------------------------------------------------- ifeval

def _ifeval_kwargs(kwargs: dict | None) -> dict:
    """The official file stores every kwarg of every checker, mostly null, and counts as floats (3.0);
    if-verifiable's checkers index and compare with them, so drop the nulls and make whole floats ints."""
    out = {}
    for k, v in (kwargs or {}).items():
        if v is None:
            continue
        out[k] = int(v) if isinstance(v, float) and v.is_integer() else v
    return out


_ifeval_ready = False


def _prepare_ifeval() -> None:
    """if-verifiable tokenizes with NLTK's punkt, whose data is a separate download that offline machines lack.
    Without it: sentence counting uses an untrained PunktSentenceTokenizer (same algorithm, default
    parameters) and word tokenization skips the sentence split (``preserve_line=True``), which only counts
    words, so the difference is immaterial. Patched inside if-verifiable's util module only."""
    global _ifeval_ready
    if _ifeval_ready:
        return
    import types

    import nltk
    from if_verifiable.ifeval import instructions_util as util

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        nltk.data.find("tokenizers/punkt/english.pickle")
    except LookupError:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        shim = types.SimpleNamespace(**{k: getattr(nltk, k) for k in dir(nltk) if not k.startswith("__")})
        shim.word_tokenize = lambda text, language="english", preserve_line=True: nltk.word_tokenize(
            text, language, preserve_line=True)
        util.nltk = shim
        tokenizer = PunktSentenceTokenizer()
        util._get_sentence_tokenizer = lambda: tokenizer
    _ifeval_ready = True


def ifeval_loose(completion: str, instructions: list[dict], prompt: str = "") -> tuple[bool, list[dict]]:
    """IFEval loose, prompt level: True when every instruction passes (loose). Also the per-instruction
    results ``[{"instruction_id", "strict", "loose"}]``. Unknown instruction ids are an error (a silently
    skipped instruction would inflate the score)."""
    _prepare_ifeval()
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    ids = [i["instruction_id"] for i in instructions]
    unknown = [i for i in ids if i not in INSTRUCTION_DICT]
    if unknown:
        raise ValueError(f"unknown IFEval instruction ids {unknown}; if-verifiable knows {len(INSTRUCTION_DICT)}")
    if not ids:
        raise ValueError("an IFEval row needs a non-empty 'instructions' list")
    results, scores = evaluate_instructions(
        response=_after_think(completion), instruction_id_list=ids,
        kwargs_list=[_ifeval_kwargs(i.get("kwargs")) for i in instructions], prompt=prompt,
        instruction_registry=INSTRUCTION_DICT)
    details = [{"instruction_id": r.instruction_id, "strict": r.strict_pass, "loose": r.loose_pass} for r in results]
    return bool(scores.binary_loose == 1.0 and len(results) == len(ids)), details
