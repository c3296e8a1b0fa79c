#!/usr/bin/env python3
"""Writes a synthetic table of news articles with long text cells: id, headline, section,
published, description (the body: 5-20 KB of paragraphs with quotes, commas, newlines and
unicode). Usage: make_articles.py ROWS OUT.csv. Deterministic for a given row count."""
import argparse
import csv
import random

SECTIONS = ["politics", "business", "science", "culture", "sport", "world"]
WORDS = ("council minister growth report markets inflation rates said according sources "
         "officials city region année über café résumé data study researchers season team "
         "league coach vote budget energy climate water school hospital court ruling").split()


def paragraph(rng):
    sentences = []
    for _ in range(rng.randint(3, 7)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 22))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), '"quoted, as said"')
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=int)
    parser.add_argument("out")
    args = parser.parse_args()
    rng = random.Random(args.rows)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "headline", "section", "published", "description"])
        for i in range(args.rows):
            target = rng.randint(5_000, 20_000)
            parts, size = [], 0
            while size < target:
                text = paragraph(rng)
                parts.append(text)
                size += len(text) + 2
            body = "\n\n".join(parts)[:target]
            writer.writerow([f"art-{i:07d}", f"Headline {i}: {rng.choice(WORDS)} {rng.choice(WORDS)}",
                             rng.choice(SECTIONS), f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}", body])


if __name__ == "__main__":
    main()
