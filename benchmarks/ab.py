"""A/B timing of this checkout's engine against another checkout's, side by side in one process.

``python benchmarks/ab.py OTHER_CHECKOUT [--rounds N]`` imports OTHER_CHECKOUT/madfunc as a second package
(``madfunc_other``) and times the engine-bound rows of ``run.py`` (targets 2-4) with both, interleaved
(the order alternates between rounds), reporting the median of per-round ratios this / other. Load from
other processes affects both sides of a round alike, which a comparison of two separate ``run.py`` runs
(each a ratio to its own reference) does not cancel. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from run import timeit  # noqa: E402

import madfunc as mf  # noqa: E402


def load_other(checkout: str):
    """The other checkout's madfunc, under the name madfunc_other (its imports are relative)."""
    path = os.path.join(os.path.abspath(checkout), "madfunc", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "madfunc_other", path, submodule_search_locations=[os.path.dirname(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["madfunc_other"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="path of the other checkout (its madfunc/ is imported)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    other = load_other(args.other)
    mlp, mlp_xy = models.mlp_params(8, 512), models.mlp_data(128, 512)
    cnn = models.cnn_params()
    cases = [("1  all-Reverse plan, MLP a segment per layer", "segmented_mlp_loss", "layer", lambda m: m.Reverse(),
              (mlp, *mlp_xy))]
    for dist in ("gaussian", "rademacher"):
        for seeding in ("auto", "kept"):
            cases.append((f"2  Random(k=1, {dist}, {seeding}) MLP 8x512 b128", "whole_mlp_loss", "mlp",
                          lambda m, d=dist, s=seeding: m.Random(k=1, distribution=d, seeding=s), (mlp, *mlp_xy)))
    for dist in ("gaussian", "rademacher"):
        for seeding in ("auto", "eager"):
            cases.append((f"3  Random(k=16, {dist}, {seeding}) MLP", "whole_mlp_loss", "mlp",
                          lambda m, d=dist, s=seeding: m.Random(k=16, distribution=d, seeding=s), (mlp, *mlp_xy)))
    for batch in (2, 32):
        cases.append((f"4  Exact() small CNN b{batch}", "whole_cnn_loss", "cnn", lambda m: m.Exact(),
                      (cnn, *models.cnn_data(batch))))
    print(f"this checkout vs {args.other}: {args.threads} threads, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    for label, loss_name, segment, strategy, data in cases:
        fns = {name: package.mixed_grad(_loss(loss_name, package), plan={segment: strategy(package)})
               for name, package in (("this", mf), ("other", other))}
        t = timeit({name: (lambda f=f, data=data: f(*data)) for name, f in fns.items()}, args.rounds, 2)
        ratio = statistics.median(a / b for a, b in zip(t["this"], t["other"], strict=True))
        print(f"{label:<44} {statistics.median(t['this']) * 1e3:9.2f} ms vs "
              f"{statistics.median(t['other']) * 1e3:9.2f} ms   this/other {ratio:6.3f}", flush=True)


def _loss(loss_name: str, package):
    """The benchmark model's loss as one segment made by ``package`` (models.py's segments are madfunc's)."""
    if loss_name == "segmented_mlp_loss":
        layer = package.fwd(models._layer, name="layer")

        def segmented(params, x, y):
            h = x
            for w, b in zip(params[::2], params[1::2], strict=False):
                h = layer(w, b, h)
            return models.F.mse_loss(h, y)

        return segmented
    if loss_name == "whole_mlp_loss":
        seg = package.fwd(models.mlp_loss, name="mlp")
        return lambda params, x, y: seg(params, x, y)
    seg = package.fwd(models.cnn_loss, name="cnn")
    return lambda params, x, y: seg(params, x, y)


if __name__ == "__main__":
    main()
