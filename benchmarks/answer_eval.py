"""Answer quality on the default corpus: key-term hit rate and grounding share, per generator.

For each question of `rag_eval_questions.jsonl` that `answer_key_terms.json` lists (keyed by the
question's text), the default corpus's dense search retrieves ``k`` passages once; each generator answers
from the same passages. Reported per generator:

- key-term hit: the answer mentions every key term of its question (a term is a set of
  alternatives ``a|b``, matched case-insensitively; a word-like term must start a word, and one of
  at most three characters must be a whole word); term recall: the share of key terms mentioned;
- grounding: the share of the answer's content words (stemmed, stopwords left out; citations
  and the ``Sources:`` line removed) found in its retrieved passages, averaged over questions;
- cited: the share of answers that cite at least one of their passages in their text (as the
  generators' `CitationFilter` reads citations: ``[2]``, not ``items[2]`` nor code); sources: the
  share that end with a ``Sources`` line (cited, or for `local`, matched by word overlap);
- seconds spent generating, answer length in words.

A generator is ``extractive`` or ``local:<packaged model>``, optionally ``@<prompt>`` for one of
`PROMPTS` (the `local` prompt to try instead of the ``local_prompt_template`` setting). With
``--answers``, every answer is appended to that JSONL file as soon as its batch is done, and the
answers already there (same generator and question) are reused: a run cut short resumes, and
``--generators`` can be scored one at a time into one table. ``--every N`` keeps every N-th
question (a fixed subset spread over the topics)::

    python benchmarks/answer_eval.py --generators extractive,local:smollm2-135m,local:gemma3-270m \\
        --every 2 --answers benchmarks/results/answer_eval_answers.jsonl --out benchmarks/results/answer_eval.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEY_TERMS = HERE / "answer_key_terms.json"
#: `local` prompts to compare with the ``local_prompt_template`` setting (``local:<model>@<name>``).
PROMPTS = {
    # One worked example of a cited answer before the real passages: small models copy its form.
    "example": (
        "Answer the question using only the numbered passages. After each sentence, cite the passage "
        "it comes from by its number in square brackets.\n\n"
        "Example:\n"
        '[1] pydoc:for\nThe "for" statement is used to iterate over the elements of a sequence '
        "(such as a string, tuple or list) or other iterable object.\n\n"
        '[2] pydoc:while\nThe "while" statement is used for repeated execution as long as an '
        "expression is true.\n\n"
        "Question: what does the while statement do?\n"
        "Answer: The while statement runs its block again and again as long as its expression is true [2].\n\n"
        "Now answer the next question the same way, citing the passages by number.\n\n"
        "{passages}\n\n"
        "Question: {question}"
    ),
}
#: ``local:<model>@turns``: the default prompt, after one worked example given as an earlier chat turn
#: (the example's prompt as the user's message, a cited answer as the assistant's).
EXAMPLE_TURN = {
    "question": "what does the while statement do?",
    "passages": [
        (
            "pydoc:for",
            'The "for" statement is used to iterate over the elements of a sequence (such as a string, '
            "tuple or list) or other iterable object.",
        ),
        ("pydoc:while", 'The "while" statement is used for repeated execution as long as an expression is true.'),
        (
            "pydoc:break",
            '"break" may only occur syntactically nested in a "for" or "while" loop. It terminates the '
            "nearest enclosing loop.",
        ),
    ],
    "answer": 'The "while" statement runs its block again and again as long as its expression is true [2]. '
    'A "break" statement inside the block ends the loop early [3].',
}
_CITATION = re.compile(r"\[\d+(?:\s*,\s*\d+)*\]")


def read_key_terms(path: Path = KEY_TERMS) -> dict[str, list[list[str]]]:
    """Each question's key terms, each term a list of alternatives."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {question: [term.split("|") for term in terms] for question, terms in raw.items()}


def mentions(answer: str, alternatives: list[str]) -> bool:
    """Whether ``answer`` mentions one of ``alternatives`` (see the module's docstring)."""
    for term in alternatives:
        pattern = re.escape(term)
        if term[:1].isalnum() or term[:1] == "_":
            pattern = r"(?<![A-Za-z0-9_])" + pattern
            if len(term) <= 3:
                pattern += r"(?![A-Za-z0-9_])"
        if re.search(pattern, answer, flags=re.IGNORECASE):
            return True
    return False


def answer_body(answer: str) -> str:
    """The answer without its ``Sources:`` line and citations."""
    return _CITATION.sub(" ", answer.split("\n\nSources", 1)[0])


def cites(answer: str, passage_count: int) -> bool:
    """Whether ``answer``'s text (before its ``Sources`` line) cites one of its ``passage_count`` passages."""
    from gpurag.rag.generators.citations import CitationFilter

    citations = CitationFilter(passage_count)
    citations.feed(answer.split("\n\nSources", 1)[0])
    citations.finish()
    return bool(citations.cited)


def grounding(answer: str, passages: list[Any]) -> float:
    """The share of the answer's content words found in ``passages`` (1.0 for an answer without any)."""
    from gpurag.rag.generators.sentences import content_terms

    words = content_terms(answer_body(answer))
    if not words:
        return 1.0
    known = set(content_terms(" ".join(passage.text for passage in passages)))
    return sum(1 for word in words if word in known) / len(words)


def score(answers: list[str], terms: list[list[list[str]]], passages: list[list[Any]]) -> dict[str, float]:
    """Key-term hit rate, term recall, mean grounding, cited share and mean words of ``answers``."""
    hits = recall = ground = cited = sourced = words = 0.0
    for answer, question_terms, found in zip(answers, terms, passages, strict=True):
        body = answer_body(answer)
        mentioned = [mentions(body, alternatives) for alternatives in question_terms]
        hits += all(mentioned)
        recall += sum(mentioned) / len(mentioned)
        ground += grounding(answer, found)
        cited += cites(answer, len(found))
        sourced += "\n\nSources" in answer
        words += len(body.split())
    n = len(answers)
    return {
        "key-term hit": hits / n,
        "term recall": recall / n,
        "grounding": ground / n,
        "cited": cited / n,
        "sources": sourced / n,
        "words": words / n,
    }


def make_generator(spec: str, args: argparse.Namespace) -> Any:
    """``extractive``, or ``local:<packaged model>`` with an optional ``@<prompt>`` of `PROMPTS`."""
    from gpurag.rag.generators import get_generator

    name, _, model = spec.partition(":")
    if name == "local":
        model, _, prompt = model.partition("@")
        if prompt and prompt not in [*PROMPTS, "turns"]:
            raise SystemExit(f"unknown prompt {prompt!r} in {spec!r}; expected one of: {', '.join(PROMPTS)}")
        options = {"device": args.device, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
        if prompt and prompt != "turns":
            options["prompt_template"] = PROMPTS[prompt]
        generator = get_generator("local", model=model or None, **options)
        if prompt == "turns":
            with_example_turn(generator)
        return generator
    return get_generator(name)


def with_example_turn(generator: Any) -> None:
    """Make ``generator`` (a `LocalGenerator` with a chat template) put `EXAMPLE_TURN` before each question."""
    from gpurag.rag.generators.base import build_prompt, check_batch
    from gpurag.rag.types import Passage

    if not generator.uses_chat_template:
        raise SystemExit("@turns needs a model with a chat template")
    example = [Passage(id=i, score=0.0, text=t, source=s) for i, (s, t) in enumerate(EXAMPLE_TURN["passages"])]
    turn = [
        {"role": "user", "content": build_prompt(str(EXAMPLE_TURN["question"]), example, generator.prompt_template)},
        {"role": "assistant", "content": EXAMPLE_TURN["answer"]},
    ]

    def format_prompts(questions: list[str], passages: list[list[Any]]) -> list[str]:
        check_batch(questions, passages)
        return [
            str(
                generator.tokenizer.apply_chat_template(
                    [*turn, {"role": "user", "content": build_prompt(q, found, generator.prompt_template)}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
            for q, found in zip(questions, passages, strict=True)
        ]

    generator.format_prompts = format_prompts


def read_answers(path: Path | None) -> dict[tuple[str, str], dict[str, Any]]:
    """The answers already in ``path`` (JSONL), by (generator, question); the last one wins."""
    if path is None or not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(row["generator"], row["question"]): row for row in rows}


def answer_all(
    spec: str, questions: list[str], passages: list[list[Any]], args: argparse.Namespace
) -> tuple[list[str], float, float]:
    """``spec``'s answers (those in ``--answers`` reused), its load seconds and its generation seconds.

    Questions are answered ``--save-every`` at a time; each answer is appended to ``--answers``
    with its share of its group's seconds as soon as the group is done.
    """
    known = read_answers(args.answers)
    todo = [i for i, q in enumerate(questions) if (spec, q) not in known]
    load_s = 0.0
    if todo:
        started = time.perf_counter()
        generator = make_generator(spec, args)
        load_s = time.perf_counter() - started
        for first in range(0, len(todo), args.save_every):
            group = todo[first : first + args.save_every]
            started = time.perf_counter()
            answers = generator.generate([questions[i] for i in group], [passages[i] for i in group])
            seconds = (time.perf_counter() - started) / len(group)
            rows = [
                {"generator": spec, "question": questions[i], "answer": a, "seconds": seconds}
                for i, a in zip(group, answers, strict=True)
            ]
            for row in rows:
                known[(spec, row["question"])] = row
            if args.answers:
                with args.answers.open("a", encoding="utf-8") as out:
                    out.writelines(json.dumps(row) + "\n" for row in rows)
            print(
                f"{spec}: {first + len(group)} of {len(todo)} answered ({seconds:.1f} s each)",
                file=sys.stderr,
                flush=True,
            )
        del generator
    rows = [known[(spec, q)] for q in questions]
    return [row["answer"] for row in rows], load_s, sum(row.get("seconds", 0.0) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", default="extractive,local:smollm2-135m,local:gemma3-270m")
    parser.add_argument("--every", type=int, default=1, help="only every N-th question (1st, N+1st...)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (after --every)")
    parser.add_argument("--k", type=int, default=None, help="passages per question (default: the top_k setting)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=16, help="questions generated between two saves")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--answers", type=Path, default=None, help="answers to reuse and to append to (JSONL)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)

    from gpurag.rag.default_corpus import load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from gpurag.settings import get_settings
    from rag_eval import read_questions
    from rag_speed import machine_description

    key_terms = read_key_terms()
    questions = [r["question"] for r in read_questions() if r["question"] in key_terms][:: args.every][: args.limit]
    k = args.k or get_settings().top_k
    embedder = get_embedder(device=args.device)
    corpus = load_default_corpus(embedder)
    passages = corpus.search(embedder.embed_batch(questions), k)
    terms = [key_terms[q] for q in questions]

    rows = []
    for spec in args.generators.split(","):
        answers, load_s, generate_s = answer_all(spec, questions, passages, args)
        rows.append({"generator": spec, "load_s": load_s, "generate_s": generate_s, **score(answers, terms, passages)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    info = machine_description(args.device or "cpu")
    subset = (
        "all"
        if args.every == 1 and args.limit is None
        else f"every {args.every}. question" + (f", first {args.limit}" if args.limit else "")
    )
    lines = [
        "### Answer quality: default corpus, key terms of `answer_key_terms.json`",
        "",
        f"- questions: {len(questions)} ({subset} of the {len(key_terms)} with key terms); passages per question: {k} "
        "(retrieved once, the same for every generator)",
        *(f"- {key}: {value}" for key, value in info.items()),
        "- load s: this run's start of the generator (0 when every answer was reused); "
        "generate s: per question, from the run that wrote the answer",
        "",
        "| generator | key-term hit | term recall | grounding | cited | sources | words | load s | generate s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['generator']} | {r['key-term hit']:.3f} | {r['term recall']:.3f} | {r['grounding']:.3f} "
            f"| {r['cited']:.3f} | {r['sources']:.3f} | {r['words']:.0f} | {r['load_s']:.1f} "
            f"| {r['generate_s'] / len(questions):.2f} |"
            for r in rows
        ),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
