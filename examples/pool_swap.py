"""Swap one import: a multiprocessing.Pool program spread over a farpool cluster.

Ordinary ``multiprocessing.Pool`` code: a worker ``initializer`` loads a word
list into a global once per worker process (the classic pattern: it works
because functions defined in this script are sent by reference and the
workers load the script as ``__mp_main__``), then ``imap_unordered`` scores
documents as they finish and ``map`` computes per-letter statistics.  The only
change is the import; ``Pool(num_cpus=..., num_gpus=...)`` accepts resource
hints as keywords too.

Run it with ``python examples/pool_swap.py``.
"""

import random
import string
import time

# from multiprocessing import Pool
from farpool import Pool

STOPWORDS: set | None = None


def load_stopwords(words):
    global STOPWORDS
    STOPWORDS = set(words)


def score(doc: tuple[int, str]) -> tuple[int, int]:
    doc_id, text = doc
    return doc_id, sum(1 for word in text.split() if word not in STOPWORDS)


def letter_share(args: tuple[str, list[str]]) -> tuple[str, float]:
    letter, texts = args
    words = [w for t in texts for w in t.split()]
    return letter, sum(w.startswith(letter) for w in words) / max(1, len(words))


def make_documents(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(500)]
    return [" ".join(rng.choices(vocab, k=200)) for _ in range(n)]


def main() -> None:
    docs = make_documents(400)
    stopwords = sorted({w for w in docs[0].split() if len(w) <= 3})
    started = time.perf_counter()
    with Pool(initializer=load_stopwords, initargs=(stopwords,)) as pool:
        best = max(pool.imap_unordered(score, enumerate(docs), chunksize=8), key=lambda item: item[1])
        shares = dict(pool.map(letter_share, [(c, docs[:50]) for c in "aeiou"]))
    elapsed = time.perf_counter() - started
    print(f"document {best[0]} has the most content words ({best[1]}), {len(docs)} scored in {elapsed:.2f} s")
    print("share of words starting with each vowel:", {c: round(s, 3) for c, s in shares.items()})


if __name__ == "__main__":
    main()
