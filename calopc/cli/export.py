r"""``calopc export``: a trained run as one ONNX graph (Geant4 Par04, or padded points for other frameworks).

Importing this module imports neither torch nor onnx (``calopc --help`` stays fast).
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json
from pathlib import Path

from .options import FORMATTER, COLLISIONS, add_output, positive_float, positive_int, threshold_arg

_EPILOG = """\
examples:
  calopc export runs/cc-cm -o cc.onnx                          # Par04 (dataset 3): prints the macro lines
  calopc export runs/cpf --target points -o cpf.onnx           # padded cells, energies and counts per shower
  calopc export runs/cc-cm -o cc.onnx --collisions sum --max-points 20000
"""


def _cmd_export(args: argparse.Namespace) -> int:
    from .._extras import _need

    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            _need(mod, "export", "calopc export")
        except ModuleNotFoundError as err:
            raise ValueError(str(err)) from None
    if not args.run_dir.is_dir():
        msg = f"{args.run_dir}: no such run directory (train one with 'calopc train')"
        raise ValueError(msg)
    from ..export.graph import export_model

    res = export_model(args.run_dir, args.output, target=args.target, collisions=args.collisions,
                       max_points=args.max_points, threshold=args.threshold, steps=args.steps, e_max=args.e_max,
                       angle_max=args.angle_max, energy_scale=args.energy_scale, ema=not args.no_ema)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
        return 0
    print(f"exported {res.model} ({args.run_dir}) to {res.output}: target {res.target}, ONNX opset {res.opset}, "
          f"{res.bytes / 1e6:.1f} MB in {res.seconds:.1f} s; onnx.checker passed")
    print(f"latent size L = {res.latent_size} (all randomness comes from it: the graph is deterministic)")
    for k, v in res.inputs.items():
        print(f"  input  {k}: {v}")
    for k, v in res.outputs.items():
        print(f"  output {k}: {v}")
    print(f"placement {res.placement_note}")
    for n in res.notes:
        print(f"note: {n}")
    if res.macro:
        print("Par04 macro lines (after /run/initialize, before /param/ActivateModel inferenceModel):")
        for line in res.macro:
            print(f"  {line}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to the ``calopc`` parser."""
    p = sub.add_parser("export", help="export a trained run as an ONNX graph (Geant4 Par04 or padded points)",
                       description="Write a run's whole sampler (shower model, points, placement in cells, readout "
                                   "threshold) as one ONNX graph that takes all its randomness from its input.",
                       epilog=_EPILOG, formatter_class=FORMATTER)
    p.add_argument("run_dir", type=Path, help="run directory of 'calopc train' or 'calopc distill'")
    add_output(p, "the .onnx file to write", required=True)
    p.add_argument("--target", choices=("par04", "points"), default="par04",
                   help="par04: input [batch, L+4] and output [batch, 40500] as Geant4's Par04 example calls its model "
                        "(dataset 3 geometry); points: energies and latent in, padded cells, energies and counts out "
                        "(default: %(default)s)")
    p.add_argument("--max-points", type=positive_int, default=None, metavar="N",
                   help="points per shower at most (points: the padded size; refused below the largest training "
                        "shower) (default: points: the run's largest training shower; par04: no cap)")
    p.add_argument("--collisions", choices=COLLISIONS, default="auto",
                   help="points sharing a cell: as 'calopc generate' (auto: alpha-free for models without alpha, "
                        "else nearest-free) (default: %(default)s)")
    p.add_argument("--threshold", type=threshold_arg, default=None, metavar="MEV|official",
                   help="readout threshold: cells with less energy (MeV) are empty (default: official, 15.15 keV "
                        "for dataset 3)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampler steps of diffusion models (default: the run's: 13 Heun steps, a distilled run 1)")
    p.add_argument("--e-max", type=positive_float, default=None, metavar="MEV",
                   help="par04: E in the input is E/E_max (default: Par04's fMaxEnergy, 1024000 MeV)")
    p.add_argument("--angle-max", type=positive_float, default=None, metavar="DEG",
                   help="par04: the angle input is (theta/deg)/angle_max (default: Par04's fMaxAngle, 90)")
    p.add_argument("--energy-scale", type=positive_float, default=1.0,
                   help="par04: factor on the output (default: 1, the calibrated cell energies of the training data; "
                        "0.033 gives the silicon energy of CaloChallenge datasets 2 and 3)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights (default: EMA)")
    p.add_argument("--json", action="store_true", help="print the export summary as JSON (default: text)")
    p.set_defaults(func=_cmd_export)
