"""`vitdeep ARGS` as it is, then a record of this rank's model weights (run under a launcher).

Set VITDEEP_TEST_CHECKSUMS=DIR. After `Trainer.fit` returns, each rank writes DIR/rank_R.json:
a SHA-256 of its `engine.module` parameters (values as float32 bytes, in name order), and where
it ran (node rank, network namespace, GLOO_SOCKET_IFNAME, VITDEEP_TEST_ENV). Only `fit` is
wrapped; the engine, data and collectives are the real ones.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def weights_digest(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and float32 values of `params`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fit_and_record(self, fit):
    result = fit(self)
    params = dict(self.engine.module.named_parameters())
    record = {
        "rank": self.dist.rank,
        "node_rank": os.environ.get("CROSS_RANK"),
        "netns": os.readlink("/proc/self/ns/net"),
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "test_env": os.environ.get("VITDEEP_TEST_ENV"),
        "dtype": str(next(iter(params.values())).dtype),
        "names": sorted(params),
        "digest": weights_digest(params),
    }
    out = Path(os.environ["VITDEEP_TEST_CHECKSUMS"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{self.dist.rank}.json").write_text(json.dumps(record))
    return result


if __name__ == "__main__":
    import vitdeep.engine.loop as loop
    from vitdeep.cli import run

    original = loop.Trainer.fit
    loop.Trainer.fit = lambda self: fit_and_record(self, original)
    run([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
