"""`tinysam models` and `tinysam segment`."""

from __future__ import annotations

import json
from pathlib import Path

from tinysam_kit.cli.common import CliError, add_model_arguments, make_predictor, parse_box, parse_point


def register(sub) -> None:
    models = sub.add_parser("models", help="list or download model weights")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    p = msub.add_parser("list", help="registered models and whether their weights are present")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("download", help="download (and verify) model weights into the cache")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_models_download)

    p = sub.add_parser("segment", help="segment one object from point/box prompts")
    p.add_argument("image")
    p.add_argument("--point", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                   help="prompt point in pixels; label 1 = object (default), 0 = background; repeatable")
    p.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1")
    p.add_argument("--out", required=True, help="PNG file for the best mask")
    p.add_argument("--all-masks", action="store_true", help="also write all three masks as OUT_0/1/2")
    add_model_arguments(p)
    p.set_defaults(func=cmd_segment)


def cmd_models_list(args) -> int:
    from tinysam_kit.models.registry import MODELS, PACKAGE_WEIGHTS, cache_dir

    print(f"{'name':<12} {'present':<8} {'file':<20} description")
    for spec in MODELS.values():
        path = (PACKAGE_WEIGHTS if spec.bundled else cache_dir()) / spec.filename
        print(f"{spec.name:<12} {'yes' if path.is_file() else 'no':<8} {spec.filename:<20} {spec.description}")
    print(f"\nweights cache: {cache_dir()} (set TINYSAM_HOME to move it)")
    return 0


def cmd_models_download(args) -> int:
    from tinysam_kit.models.registry import resolve_weights

    for name in args.names:
        path, _ = resolve_weights(name)
        print(f"{name}: {path}")
    return 0


def cmd_segment(args) -> int:
    import numpy as np
    from PIL import Image

    from tinysam_kit.data.images import load_image

    if not args.point and not args.box:
        raise CliError("give at least one --point x,y[,label] or a --box x0,y0,x1,y1")
    image = load_image(args.image)
    predictor = make_predictor(args)
    predictor.set_image(image)
    coords = [[x, y] for x, y, _ in args.point] or None
    labels = [label for _, _, label in args.point] or None
    mask, score, predicted_iou = predictor.segment(coords, labels, args.box)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    answer = {"mask": str(out), "score": score, "predicted_iou": predicted_iou, "area": int(mask.sum()),
              "model_version": predictor.model_version}
    if args.all_masks:
        masks, scores, _ = predictor.predict(coords, labels, args.box)
        for i, each in enumerate(masks):
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            Image.fromarray(each.astype(np.uint8) * 255).save(path)
        answer["scores"] = [float(s) for s in scores]
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    print(json.dumps(answer))
    return 0
