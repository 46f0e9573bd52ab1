"""Regenerate loadtest/prompts.jsonl: text-to-SQL questions (with reference SQL) over the
bundled shop schema, drawn from stack/sql_corpus.py with a seed no model was trained on.

    python -m loadtest.make_prompts
"""

import json
from pathlib import Path

from stack import sql_corpus

OUT = Path(__file__).with_name("prompts.jsonl")
SEED, COUNT = 20261125, 300


def main() -> None:
    lines = [json.dumps({"question": p.question, "sql": p.sql}) for p in
             sql_corpus.pairs(COUNT, seed=SEED)]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {OUT}")


if __name__ == "__main__":
    main()
