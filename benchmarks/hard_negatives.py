"""How hard-negative mining (`unclip encoders fit`'s `caption_neighbours`) grows with the number of captions.

Mines web-like captions at two sizes side by side and prints, for each, the wall time, the time
and word-level comparisons per caption and the neighbours found; then the time-per-caption ratio
of the larger to the smaller (quadratic mining reads the size ratio, n log n about 1.2) and what
that rate means at the fit's former 20,000-caption cap and at LAION-2B's size. `--quadratic`
also times the all-pairs mining it replaced, at the smaller size.

The captions: words drawn from a Zipf law over 50,000 words, lognormal lengths (median 9 words),
with the repeats web captions have: exact copies, copies one to three words away, stock openings
("stock photo of", "a close up of"), and a share in the embedded default's grammar.

    python benchmarks/hard_negatives.py --sizes 2000,16000 --quadratic
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STOCK_OPENINGS = [
    "stock photo of",
    "a close up of a",
    "a picture of a",
    "illustration of a",
    "vector illustration of",
    "a black and white photo of",
    "royalty free image of",
    "a painting of a",
    "aerial view of",
    "portrait of a",
]
LAION_2B = 2_320_000_000  # LAION-2B-en's image-text pairs


def web_captions(count: int, seed: int = 0) -> list[str]:
    from data_pipeline import synthetic

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{rank}" for rank in range(50_000)])
    weights = 1.0 / (np.arange(50_000) + 2.7)  # Zipf-Mandelbrot, as word counts in captions run
    weights /= weights.sum()
    lengths = np.clip(np.round(rng.lognormal(np.log(9), 0.6, count)), 1, 77).astype(int)
    words = iter(vocab[rng.choice(len(vocab), size=int(lengths.sum()) + 4 * count, p=weights)].tolist())
    kinds = rng.choice(5, size=count, p=[0.08, 0.15, 0.10, 0.12, 0.55])
    attributes = random.Random(seed)  # the embedded default draws its attributes with one
    captions: list[str] = []
    for i, (kind, length) in enumerate(zip(kinds.tolist(), lengths.tolist(), strict=True)):
        if kind == 0 and captions:  # an exact repeat
            captions.append(captions[int(rng.integers(len(captions)))])
        elif kind == 1 and captions:  # an earlier caption, one to three words changed
            text = captions[int(rng.integers(len(captions)))].split()
            for _ in range(int(rng.integers(1, 4))):
                at, edit = int(rng.integers(len(text) + 1)), int(rng.integers(3))
                if edit == 0 and at < len(text):
                    text[at] = next(words)
                elif edit == 1 or len(text) < 2:
                    text.insert(at, next(words))
                else:
                    del text[min(at, len(text) - 1)]
            captions.append(" ".join(text))
        elif kind == 2:
            opening = STOCK_OPENINGS[int(rng.integers(len(STOCK_OPENINGS)))]
            captions.append(" ".join([opening, *(next(words) for _ in range(max(1, length - 3)))]))
        elif kind == 3:
            truth = synthetic.sample_attributes(attributes)
            template = synthetic.CAPTION_TEMPLATES[i % len(synthetic.CAPTION_TEMPLATES)]
            captions.append(template.format(shape=truth.shape, color=truth.color, background=truth.background))
        else:
            captions.append(" ".join(next(words) for _ in range(length)))
    return captions


def quadratic(captions: list[str], max_edits: int = 2) -> list[list[int]]:
    """The mining `caption_neighbours` replaced: every pair of captions compared."""
    from data_pipeline.encoder_fit import _word_edits

    words = [c.lower().replace(",", " ").split() for c in captions]
    neighbours: list[list[int]] = [[] for _ in captions]
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            if abs(len(words[i]) - len(words[j])) <= max_edits and 0 < _word_edits(words[i], words[j]) <= max_edits:
                neighbours[i].append(j)
                neighbours[j].append(i)
    return neighbours


def mine(captions: list[str], rounds: int) -> dict:
    from data_pipeline import encoder_fit

    compare = encoder_fit._word_edits
    calls = [0]

    def counted(a, b):
        calls[0] += 1
        return compare(a, b)

    encoder_fit._word_edits = counted  # counted in a run of its own, so the timed runs carry no counter
    try:
        neighbours = encoder_fit.caption_neighbours(captions)
    finally:
        encoder_fit._word_edits = compare
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        encoder_fit.caption_neighbours(captions)
        times.append(time.perf_counter() - started)
    return {
        "captions": len(captions),
        "seconds": min(times),
        "ms_per_caption": 1e3 * min(times) / len(captions),
        "comparisons_per_caption": calls[0] / len(captions),
        "neighbours_per_caption": sum(map(len, neighbours)) / len(captions),
        "with_neighbours": sum(1 for n in neighbours if n) / len(captions),
    }


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,16000", help="two numbers of captions")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs at each size (the fastest counts)")
    parser.add_argument("--quadratic", action="store_true", help="also time the all-pairs mining at the smaller size")
    parser.add_argument("--json")
    args = parser.parse_args()
    small, large = sorted(int(s) for s in args.sizes.split(","))
    from data_pipeline import encoder_fit  # noqa: F401 - imports torch and open_clip now, not inside a timed run

    rows = [mine(web_captions(n), args.rounds) for n in (small, large)]
    print(f"{'captions':>9} {'seconds':>8} {'ms/caption':>11} {'comparisons/caption':>20} {'neighbours/caption':>19}")
    for r in rows:
        print(
            f"{r['captions']:>9,} {r['seconds']:>8.2f} {r['ms_per_caption']:>11.4f} "
            f"{r['comparisons_per_caption']:>20.1f} {r['neighbours_per_caption']:>19.1f}"
        )
    ratio = rows[1]["ms_per_caption"] / rows[0]["ms_per_caption"]
    growth = large / small
    print(
        f"\ntime per caption, {large:,} / {small:,}: {ratio:.2f} "
        f"(quadratic mining would read {growth:.1f}; n log n {np.log(large) / np.log(small):.2f})"
    )
    per_caption_s = rows[1]["ms_per_caption"] / 1e3  # the larger size's rate, linear beyond it
    result = {"sizes": rows, "time_per_caption_ratio": ratio, "extrapolated_s": {}}
    for n, name in ((20_000, "the fit's former cap"), (LAION_2B, "LAION-2B")):
        result["extrapolated_s"][str(n)] = per_caption_s * n
        print(f"  extrapolated at that rate to {n:,} captions ({name}): {duration(per_caption_s * n)} on one core")
    print(
        "  (LAION-2B's captions would not fit one process's memory; the fit holds every picture it trains on in "
        "memory, so its captions number far fewer)"
    )
    if args.quadratic:
        captions = web_captions(small)
        started = time.perf_counter()
        quadratic(captions)
        seconds = time.perf_counter() - started
        result["quadratic_s"] = {str(small): seconds}
        print(
            f"\nall-pairs mining of the same {small:,} captions: {seconds:.1f} s, {seconds / rows[0]['seconds']:.0f}x; "
            f"extrapolated (x n^2) to 20,000 captions: {duration(seconds * (20_000 / small) ** 2)}"
        )
    if args.json:
        from models.base import storage

        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
