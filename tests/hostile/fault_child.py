"""A gmmquant job that SIGKILLs itself at a chosen point (run by test_faults.py in a fresh process).

    python fault_child.py POINT JOB ARGS...

POINT: `write` (while the 5th tensor is being written), `between-renames` (the two-rename fallback of
--overwrite, after the old output moved aside and before the new one took its place), `after-swap` (right
after the atomic exchange, before the old output is deleted), `hold` (no kill: block inside the write until
the file named by $HOLD_UNTIL exists, having created $HOLD_READY; for the lock tests).
JOB: `cli ARGS...` runs `gmmquant ARGS...`; `save_model SRC OUT [--overwrite]` replaces the experts of SRC
with w8a16 and calls save_model.
"""

import os
import signal
import sys
import time
from pathlib import Path

import gmmquant.pack.safety as safety
import gmmquant.pack.shards as shards


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    if point in ("write", "hold"):
        real_add, count = shards.ShardWriter.add, [0]

        def add(self, name, tensor):
            count[0] += 1
            if count[0] == 5:
                if point == "write":
                    die()
                Path(os.environ["HOLD_READY"]).touch()
                while not Path(os.environ["HOLD_UNTIL"]).exists():
                    time.sleep(0.05)
            return real_add(self, name, tensor)
        shards.ShardWriter.add = add
    elif point == "between-renames":
        def no_exchange(a, b):
            raise safety._NoExchange()
        safety._exchange = no_exchange
        real_replace = os.replace

        def replace(a, b):
            if ".tmp-" in str(a) and any(".old-" in p.name for p in Path(a).parent.iterdir()):
                die()
            return real_replace(a, b)
        os.replace = replace
    elif point == "after-swap":
        real_exchange = safety._exchange

        def exchange(a, b):
            real_exchange(a, b)
            die()
        safety._exchange = exchange
    else:
        raise SystemExit(f"unknown point {point}")


def main() -> int:
    point, job, *args = sys.argv[1:]
    arm(point)
    if job == "cli":
        from gmmquant.cli import main as cli

        return cli(args)
    if job == "save_model":
        import transformers

        import gmmquant

        model = transformers.AutoModelForCausalLM.from_pretrained(args[0])
        gmmquant.replace_experts(model, "w8a16")
        gmmquant.save_model(model, args[1], source_dir=args[0], overwrite="--overwrite" in args)
        return 0
    raise SystemExit(f"unknown job {job}")


if __name__ == "__main__":
    sys.exit(main())
