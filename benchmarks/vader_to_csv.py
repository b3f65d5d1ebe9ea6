"""Turn the human-rated sentiment corpora in the ``vaderSentiment`` source distribution on PyPI into train /
validation CSV files.

The package's source distribution (``vaderSentiment-3.3.2.tar.gz``, 2.5 MB; the wheel leaves the corpora out) holds
``additional_resources/hutto_ICWSM_2014.tar.gz``, the ground truth of Hutto & Gilbert (ICWSM 2014): texts whose
sentiment 20 people each rated from -4 to +4, one line per text, ``id<TAB>mean rating<TAB>text``:

* ``tweets``: 4,200 tweets (``tweets_GroundTruth.txt``; a median of 13 words);
* ``amazon``: 3,708 sentences of 300 Amazon product reviews (``amazonReviewSnippets_GroundTruth.txt``);
* ``nyt``: 5,190 sentences of 498 New York Times opinion editorials (``nytEditorialSnippets_GroundTruth.txt``).

Two tasks (``--task``):

* ``polarity`` (one text): ``positive`` when the text's mean rating is above ``--margin`` (default 0), ``negative``
  when below ``-margin``; texts in between are left out.
* ``compare`` (text pairs): which of two texts people rated more positive, ``first`` or ``second``. Each text of a
  split is paired with ``--partners`` texts drawn at random from the same split; a pair is kept when the two mean
  ratings differ by at least ``--gap`` (default 1, a quarter of the scale's half-width), and its order is random, so
  the labels are balanced and neither text alone tells the answer.

The split is fixed by ``--seed`` and keeps groups whole (the sentences of one review or editorial, ids
``DOC_SENTENCE``; identical tweets), as ``benchmarks/movie_reviews_to_csv.py`` does; pairs are formed after it, so no
text of a validation pair is seen in training. Writes ``OUT/train.csv``, ``OUT/validation.csv`` and ``OUT/data.json``
(read by ``benchmarks/study.py --data OUT``) and prints the label counts. Without ``--sdist`` the source
distribution is fetched with pip into ``--cache``::

  python benchmarks/vader_to_csv.py --source tweets --out /tmp/tweets
  python benchmarks/vader_to_csv.py --source tweets --task compare --out /tmp/tweet_pairs
  python benchmarks/vader_to_csv.py --source nyt --sdist vaderSentiment-3.3.2.tar.gz --out /tmp/nyt
"""
from __future__ import annotations

import argparse
import html
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_files import grouped_split, write_task  # noqa: E402

VERSION = "3.3.2"
INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
FILES = {"tweets": "tweets_GroundTruth.txt", "amazon": "amazonReviewSnippets_GroundTruth.txt",
         "nyt": "nytEditorialSnippets_GroundTruth.txt"}
LABEL_NAMES = {"polarity": ["negative", "positive"], "compare": ["first", "second"]}


def fetch_sdist(cache: Path) -> Path:
  """``cache/vaderSentiment-VERSION.tar.gz``, downloaded with pip (source distribution, no dependencies) if absent."""
  path = cache / f"vaderSentiment-{VERSION}.tar.gz"
  if not path.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"vaderSentiment=={VERSION}", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
      raise SystemExit(f"could not download vaderSentiment=={VERSION}'s source distribution with pip into {cache} "
                       f"(pass --sdist with a downloaded vaderSentiment-{VERSION}.tar.gz):\n{done.stderr.strip()}")
  return path


def read_ground_truth(sdist: Path, source: str) -> list[tuple[str, float, str]]:
  """``(id, mean rating, text)`` of every line of one corpus, read from the source distribution without unpacking it
  to disk; the text with HTML entities (``&amp;``) decoded and whitespace collapsed."""
  name = FILES[source]
  try:
    with tarfile.open(sdist) as outer:
      member = next((m for m in outer.getmembers() if m.name.endswith("/" + INNER)), None)
      if member is None:
        raise SystemExit(f"{sdist}: holds no {INNER}; expected vaderSentiment-{VERSION}.tar.gz, the source "
                         f"distribution (the wheel leaves the corpora out)")
      with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read())) as inner:
        found = next((m for m in inner.getmembers() if m.name.endswith("/" + name)), None)
        if found is None:
          raise SystemExit(f"{sdist}: {INNER} holds no {name}")
        raw = inner.extractfile(found).read()
  except (tarfile.TarError, OSError) as e:
    raise SystemExit(f"--sdist {sdist}: not a readable .tar.gz ({e})") from None
  rows = []
  for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
    if not line.strip():
      continue
    parts = line.split("\t")
    try:
      if len(parts) != 3:
        raise ValueError
      rows.append((parts[0].strip(), float(parts[1]), " ".join(html.unescape(parts[2]).split())))
    except ValueError:
      raise SystemExit(f"{sdist}: {name} line {i + 1}: expected 'id<TAB>mean rating<TAB>text', got {line[:80]!r}") \
          from None
  return rows


def group_of(source: str, ident: str, text: str) -> str:
  """The split group of one row: a review's or editorial's sentences share one (the id before ``_``); a tweet's group
  is its text."""
  return text if source == "tweets" else ident.split("_")[0]


def polarity(rows, source: str, margin: float) -> tuple[list[tuple[str]], list[str], list[str]]:
  """``(texts, labels, groups)`` of the rows whose mean rating lies outside ``[-margin, margin]``."""
  if margin < 0:
    raise SystemExit(f"--margin={margin}: expected a rating >= 0")
  kept = [(i, s, t) for i, s, t in rows if abs(s) > margin]
  return ([(t,) for _, _, t in kept], [LABEL_NAMES["polarity"][int(s > 0)] for _, s, _ in kept],
          [group_of(source, i, t) for i, _, t in kept])


def compare(rows, split: list[int], partners: int, gap: float, seed: int) -> tuple[list[tuple[str, str]], list[str]]:
  """The pairs of one split (``split`` indexes ``rows``): every text with ``partners`` others of the split drawn with
  ``seed``, kept when their mean ratings differ by at least ``gap`` (a pair drawn twice, in either order, once), in a
  random order; the label says which is rated more positive."""
  if partners < 1 or gap <= 0:
    raise SystemExit(f"--partners={partners} --gap={gap}: expected at least one partner and a gap above 0")
  rng = np.random.default_rng(seed)
  seen, pairs, labels = set(), [], []
  for a in split:
    for b in rng.choice(split, size=min(partners, len(split)), replace=False):
      b = int(b)
      key = (min(a, b), max(a, b))
      if a == b or key in seen or abs(rows[a][1] - rows[b][1]) < gap:
        continue
      seen.add(key)
      first, second = (a, b) if rng.random() < 0.5 else (b, a)
      pairs.append((rows[first][2], rows[second][2]))
      labels.append(LABEL_NAMES["compare"][int(rows[second][1] > rows[first][1])])
  return pairs, labels


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--source", required=True, choices=tuple(FILES), help="which corpus")
  p.add_argument("--out", type=Path, required=True, help="output directory")
  p.add_argument("--sdist", type=Path, default=None, help=f"vaderSentiment-{VERSION}.tar.gz (default: fetched by pip)")
  p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jaxformers",
                 help="where a fetched source distribution is kept")
  p.add_argument("--task", default="polarity", choices=tuple(LABEL_NAMES), help="one text's polarity, or which of "
                 "two texts is rated more positive")
  p.add_argument("--margin", type=float, default=0.0,
                 help="polarity: texts rated within [-margin, margin] are left out")
  p.add_argument("--partners", type=int, default=2, help="compare: partners drawn for each text")
  p.add_argument("--gap", type=float, default=1.0, help="compare: least difference of the two mean ratings")
  p.add_argument("--seed", type=int, default=0, help="fixes the split")
  p.add_argument("--validation-fraction", type=float, default=0.2, help="share of the examples held out")
  a = p.parse_args(argv)
  sdist = a.sdist if a.sdist is not None else fetch_sdist(a.cache)
  if not sdist.is_file():
    raise SystemExit(f"--sdist {sdist}: no such file; expected vaderSentiment-{VERSION}.tar.gz")
  rows = read_ground_truth(sdist, a.source)
  if a.task == "polarity":
    texts, labels, groups = polarity(rows, a.source, a.margin)
    if not texts:
      raise SystemExit(f"{sdist}: no {a.source} text is rated outside [-{a.margin}, {a.margin}]")
    train, val = grouped_split(groups, a.seed, a.validation_fraction)
    write_task(a.out, ["text"], texts, labels, LABEL_NAMES["polarity"], {"train": train, "validation": val},
               f"{sdist} ({FILES[a.source]}, polarity, margin {a.margin})", a.seed)
    return
  train, val = grouped_split([group_of(a.source, i, t) for i, _, t in rows], a.seed, a.validation_fraction)
  texts, labels, splits = [], [], {}
  for name, split, seed in (("train", train, a.seed + 2), ("validation", val, a.seed + 3)):
    pairs, names = compare(rows, split, a.partners, a.gap, seed)
    splits[name] = list(range(len(texts), len(texts) + len(pairs)))
    texts += pairs
    labels += names
  write_task(a.out, ["first", "second"], texts, labels, LABEL_NAMES["compare"], splits,
             f"{sdist} ({FILES[a.source]}, compare, {a.partners} partners, gap {a.gap})", a.seed)


if __name__ == "__main__":
  main()
