"""Quick quality comparison of toy students (and the teacher) on the first N evaluation prompts.

    python benchmarks/toy_quality.py --prompts results/prompts/eval.csv --num 400 --cache /tmp/rows \\
        --row teacher-40:40:6 --row init-4:4:1 --row rapm:4:1:results/train/rapm/lora.safetensors

Each ``--row NAME:STEPS:GUIDANCE[:LORA]`` is sampled through the teacher pipeline (rapm.sample.generate,
image i from the noise of seed + i as in the evaluation) and scored like the toy protocol: Fréchet
distance in toy-CLIP features against the renders of the same prompts, the attribute reader's
accuracy, and, against the FIRST row (the teacher, sampled from the same noise): the mean pixel RMSE
(0-255) of each image to the teacher's image of the same index and the Fréchet distance to the
teacher's samples. ``--cache DIR`` keeps each row's images (``NAME.npy``) so a rerun only samples new
rows. Fewer images than the protocol's 2,000: a quick look, not the table's numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main(argv=None) -> int:
    from rapm.metrics import feature_extractor, frechet_distance, gaussian_stats
    from rapm.pipeline import generate, load_row_pipeline
    from rapm.shards import item_seed
    from rapm.toy.captions import reference_image
    from rapm.toy.reader import accuracy
    from rapm.toy.scene import parse_caption

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--prompts", required=True, help="eval.csv of the toy profile")
    p.add_argument("--num", type=int, default=400)
    p.add_argument("--row", action="append", required=True, metavar="NAME:STEPS:GUIDANCE[:LORA]")
    p.add_argument("--teacher", default="rapm:tinysd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="folder for each row's images (NAME.npy), reused when present")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = pd.read_csv(args.prompts, keep_default_na=False).iloc[: args.num]
    captions = list(prompts["caption"])
    scenes = [parse_caption(c) for c in captions]
    extract = feature_extractor("toyclip")
    ref = gaussian_stats(
        extract(np.stack([reference_image(c, int(i), 32) for c, i in zip(captions, prompts["image_id"])]))
    )
    teacher_cfg = {"path": args.teacher, "type": "auto", "dtype": "float32", "device": "cpu"}
    cache = Path(args.cache) if args.cache else None
    print(
        f"{'row':<28}{'FD':>8}{'all':>7}{'colour':>8}{'shape':>8}{'position':>9}{'count':>7}{'RMSE→T':>8}{'FD→T':>8}"
        f"   ({len(captions)} prompts; →T: against the first row, same noise)"
    )
    first = None
    for spec in args.row:
        name, steps, guidance, *lora = spec.split(":", 3)
        path = cache / f"{name}-{len(captions)}.npy" if cache else None
        if path is not None and path.is_file():
            images = np.load(path)
        else:
            teacher = load_row_pipeline({"name": name, "lora": lora[0] if lora else None}, teacher_cfg)
            images = np.concatenate(
                [
                    generate(
                        teacher,
                        captions[i : i + 100],
                        [item_seed(args.seed, k) for k in range(i, min(i + 100, len(captions)))],
                        steps=int(steps),
                        guidance=float(guidance),
                    )
                    for i in range(0, len(captions), 100)
                ]
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, images)
        a = accuracy(images, scenes)
        feats = extract(images)
        fd = frechet_distance(*gaussian_stats(feats), *ref)
        if first is None:
            first = images, gaussian_stats(feats)
        rmse = np.sqrt(((images.astype(np.float64) - first[0]) ** 2).reshape(len(images), -1).mean(axis=1)).mean()
        fd_t = frechet_distance(*gaussian_stats(feats), *first[1])
        print(
            f"{name:<28}{fd:>8.4f}{a['all']:>7.3f}{a['colour']:>8.3f}{a['shape']:>8.3f}{a['position']:>9.3f}{a['count']:>7.3f}"
            f"{rmse:>8.2f}{fd_t:>8.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
