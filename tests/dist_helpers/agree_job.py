"""A torchrun job in which only rank 1 finds bad input inside Dist.agreed(): every rank must refuse with
that error (rank 0 prints it, once) and exit 2 -- none left waiting in a collective."""
import sys

from pipeline.stage1.distributed import init_distributed
from pipeline.utils import UserError

dist = init_distributed("cpu")
try:
    with dist.agreed():
        if dist.rank == 1:
            raise UserError("only rank 1 sees this")
    dist.barrier()  # a rank that went on would wait here
    print("no error: every rank went on")
except UserError as e:
    if dist.is_main:
        print(f"Error: {e}", file=sys.stderr)
    dist.close()
    sys.exit(2)
dist.close()
