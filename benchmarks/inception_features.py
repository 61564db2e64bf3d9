"""Write the features file FID needs: Inception-v3 pool3 (2048-d, the TF-ported FID weights) as
TorchScript, for ``pgm_dist.images.quality`` (``load_feature_extractor``, ``fid``).

Inception weights cannot be downloaded on the machines pgm_dist is developed on, so the feature
network is a file. On a machine with internet:

    pip install pytorch-fid
    python benchmarks/inception_features.py --out inception_pool3.pt

and pass ``inception_pool3.pt`` as the features file. The traced module maps images
``float [N, 3, H, W]`` in [0, 1] to ``[N, 2048]``; it resizes to 299x299 and maps [0, 1] to
[-1, 1] inside, as pytorch-fid does. FIDs are comparable with published numbers only with these
weights and the reference set's statistics computed the same way.

After saving, the script loads the file back and checks it against the untraced network on
images of another batch size and resolution (``--check-tol``; 0 skips the check).
"""
from __future__ import annotations

import argparse
import sys

import torch


class Pool3(torch.nn.Module):
    """pytorch-fid's FID Inception-v3 up to pool3: ``[N, 3, H, W]`` in [0, 1] -> ``[N, 2048]``."""

    def __init__(self):
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        # resize to 299x299 and [0, 1] -> [-1, 1] inside, as pytorch-fid does
        self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                               normalize_input=True, use_fid_inception=True)

    def forward(self, images):  # [N, 3, H, W] in [0, 1] -> [N, 2048]
        return self.net(images)[0].flatten(1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="inception_pool3.pt", help="TorchScript file to write")
    p.add_argument("--trace-size", type=int, default=256, help="side of the random images the trace runs on")
    p.add_argument("--check-tol", type=float, default=1e-4,
                   help="max abs difference allowed between the saved file and the untraced network (0: no check)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = Pool3().eval()
    except ImportError:
        print("error: needs pytorch-fid (pip install pytorch-fid) and internet for its weights", file=sys.stderr)
        return 2
    with torch.no_grad():
        torch.jit.trace(model, torch.rand(2, 3, args.trace_size, args.trace_size)).save(args.out)
        print(f"wrote {args.out}")
        if args.check_tol > 0:
            images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
            loaded = torch.jit.load(args.out).eval()
            saved, eager = loaded(images), model(images)
            error = (saved - eager).abs().max().item()
            print(f"features {tuple(saved.shape)}; max abs difference from the untraced network {error:.2e}")
            if saved.shape != (3, 2048) or error > args.check_tol:
                print(f"error: the saved module does not match (tolerance {args.check_tol})", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
