"""One `moequant eval` in its own process, for the reference-cache concurrency tests.

    python eval_worker.py '{"ref_dir": ..., "model_dir": ..., ...}' [GATE_FILE]

Prints the JSON report on stdout. With GATE_FILE, the reference pass stops before its
second window until that file exists, so a test can hold a build half-way (to start a
second run against it, or to kill it) without relying on timing.
"""

import json
import os
import sys
import time

from moequant import evaluate as ev


class Gated:
    def __init__(self, model, gate):
        self.model, self.gate, self.calls = model, gate, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == 2:
            deadline = time.monotonic() + 300
            while not os.path.exists(self.gate):
                if time.monotonic() > deadline:
                    raise SystemExit("gate file never appeared")
                time.sleep(0.02)
        return self.model(x)


def main():
    kwargs = json.loads(sys.argv[1])
    gate = sys.argv[2] if len(sys.argv) > 2 else None
    reference = {"loaded": False}

    def loader(path, fused=False):
        model = ev.load_model(path, fused=fused)
        if gate and not reference["loaded"]:  # the first load is the reference
            reference["loaded"] = True
            return Gated(model, gate)
        return model

    report = ev.evaluate(**kwargs, loader=loader)
    print(json.dumps(ev._json_safe(report)))


if __name__ == "__main__":
    main()
