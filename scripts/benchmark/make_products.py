#!/usr/bin/env python3
"""Writes a synthetic product table: sku, name, brand, category, price, description (2-5
sentences with quotes, commas, newlines and unicode; 1% empty). Usage: make_products.py ROWS
OUT.csv [--duplicates FRACTION]. Deterministic for a given row count."""
import argparse
import csv
import random

BRANDS = ["Acme", "Büro & Co", "Garten-Werk", "Tooly", "Kidz", "Nordlicht", "Café Crème", "Ōkami"]
CATEGORIES = ["toys", "tools", "garden", "kitchen", "office"]
NOUNS = ["teddy bear", "puzzle", "kite", "hammer", "drill", "garden hose", "rake", "plant pot",
         "kettle", "stapler", "lamp", "notebook", "watering can", "screwdriver set", "toy train"]
ADJECTIVES = ["sturdy", "bright", "compact", "durable", "classic", "lightweight", "premium", "handy"]
SENTENCES = [
    'This {adj} {noun} is made for "everyday" use, at home, at work, or outdoors.',
    "Built by {brand}, it measures 20×30 cm and weighs 1,5 kg.",
    "Customers say: \"it's the best {noun} I've owned\" — and we agree.",
    "Comes with a 2-year warranty; spare parts are available.",
    "Dishwasher-safe parts, BPA-free materials, and a ✓ safety certificate.",
    "Ideal as a gift for birthdays, holidays, or just because.",
    "Note: colours may vary slightly from the photos.\nAssembly takes about 5 minutes.",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=int)
    parser.add_argument("out")
    parser.add_argument("--duplicates", type=float, default=0.0, help="fraction of rows that repeat an earlier row exactly")
    args = parser.parse_args()
    rng = random.Random(args.rows)
    earlier = []
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "name", "brand", "category", "price", "description"])
        for i in range(args.rows):
            if earlier and rng.random() < args.duplicates:
                writer.writerow(rng.choice(earlier))
                continue
            brand = rng.choice(BRANDS)
            noun = rng.choice(NOUNS)
            adj = rng.choice(ADJECTIVES)
            if rng.random() < 0.01:
                description = ""
            else:
                picked = rng.sample(SENTENCES, rng.randint(2, 5))
                description = f"Item {i}: " + " ".join(s.format(adj=adj, noun=noun, brand=brand) for s in picked)
            row = [f"{i:08d}", f"{brand} {noun}", brand, rng.choice(CATEGORIES),
                   f"{rng.randint(1, 500)}.{rng.choice(['00', '50', '99'])}", description]
            if args.duplicates and len(earlier) < 50_000:
                earlier.append(row)
            writer.writerow(row)


if __name__ == "__main__":
    main()
