#!/usr/bin/env bash
# The whole pipeline on a built-in default that needs no download (called by `make demo`):
# synthetic person images + backgrounds + a random-weight PATH-B checkpoint in the released
# layout -> FFCV -> teacher cache (Zarr) -> verify/info -> student training -> export -> reload.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=${DEMO_DIR:-demo_out}
rm -rf "$DEMO"  # every demo starts from scratch: inputs, store and run are regenerated
mkdir -p "$DEMO"
step() { printf '\n=== %s\n' "$*"; }

step "1/7 built-in inputs: synthetic persons, backgrounds, random PATH-B checkpoint"
"$PY" -m cache_teacher demo-data "$DEMO/inputs"

step "2/7 pack images and backgrounds into FFCV"
"$PY" -m cache_teacher pack "$DEMO/inputs/persons" "$DEMO/persons.beton"
"$PY" -m cache_teacher pack "$DEMO/inputs/backgrounds" "$DEMO/backgrounds.beton"

step "3/7 picture of what teacher and student see"
"$PY" -m cache_teacher views grid --images "$DEMO/persons.beton" --backgrounds "$DEMO/backgrounds.beton" --out "$DEMO/views.png"

step "4/7 run the teacher once, write the target store"
"$PY" -m cache_teacher run --teacher path-b --weights "$DEMO/inputs/path-b.pth" \
  --images "$DEMO/persons.beton" --backgrounds "$DEMO/backgrounds.beton" \
  --views-per-image 2 --calibration-images 16 --out "$DEMO/targets.zarr"

step "5/7 verify and describe the store"
"$PY" -m cache_teacher verify "$DEMO/targets.zarr" --weights "$DEMO/inputs/path-b.pth"
"$PY" -m cache_teacher info "$DEMO/targets.zarr"

step "6/7 train the default student (path-b_vit-ti) from the cache"
"$PY" -m train_student --recipe path-b_vit-ti --store "$DEMO/targets.zarr" \
  --images "$DEMO/persons.beton" --backgrounds "$DEMO/backgrounds.beton" --out "$DEMO/run" \
  --batch-size 2 --epochs 10 --warmup-epochs 1 --lr 5e-4  # 240 steps: a short real schedule on 2 CPU cores

step "7/7 reload the exported student through timm (local-dir) and its torch.export program"
"$PY" - "$DEMO/run" <<'PYEOF'
import sys, pathlib, torch, timm
import dpal  # registers the students with timm
run = pathlib.Path(sys.argv[1])
images = torch.randn(1, 3, 256, 128)
for name in ("student", "student_ema"):
    model = timm.create_model(f"local-dir:{run / name}")
    program = torch.export.load(str(run / name / "model.pt2")).module()
    with torch.no_grad():
        out = model.forward_features(images)
        same = torch.allclose(program(images), out, atol=1e-5)
    print(f"{name}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())/1e6:.2f}M params, "
          f"features {tuple(out.shape)}, program matches: {same}")
PYEOF
printf '\nDemo finished. Outputs in %s (views.png, targets.zarr, run/ with loss plot and exports).\n' "$DEMO"
