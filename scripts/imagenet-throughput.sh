#!/bin/sh
# Throughput of the drift study at ImageNet size (ResNet50, 224x224) on this machine, without
# ImageNet: a generated folder of random-pixel JPEGs in 500x375 (ILSVRC's typical size) under
# two synset folders, and a randomly initialised ResNet50 state dict (the arithmetic, hence the
# time, does not depend on the pixel or weight values; denormals are flushed). The study prints
# its images/s per configuration before it starts and writes it to timing.csv.
# Usage: sh scripts/imagenet-throughput.sh [OUT] [extra drift arguments, e.g. --device cuda]
set -eu
OUT=${1:-runs/drift-throughput}
[ $# -gt 0 ] && shift
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PYTHON=${PYTHON:-python}
"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

work = Path(sys.argv[1])
rng = np.random.default_rng(0)
for synset in ("n01443537", "n15075141"):
    (work / "images" / synset).mkdir(parents=True)
    for i in range(16):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "images" / synset / f"{i}.JPEG", quality=90)
torch.manual_seed(0)
torch.save(torchvision.models.resnet50().state_dict(), work / "resnet50-random.pt")
PY
"$PYTHON" -m studies.drift --data "$WORK/images" --weights "$WORK/resnet50-random.pt" \
    --images 16 --calib-images 16 --batch-size 8 --modes nearest_even toward_zero \
    --bits 8 --targets both --remedy-bits --int8-images 0 --out "$OUT" --force "$@"
