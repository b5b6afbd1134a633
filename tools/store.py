"""The store tools as a script: the same commands and output as ``streamrl store``.

    python tools/store.py inspect runs/dqn_cartpole/replay.zarr
    python tools/store.py check runs/dqn_cartpole/replay.zarr      # exit 1 when it finds a problem
    python tools/store.py sample runs/dqn_cartpole/replay.zarr -n 5 --seed 0
    python tools/store.py export runs/dqn_cartpole/replay.zarr --to rows.npz
    python tools/store.py import rows.npz --to copy.zarr --capacity 100000
    python tools/store.py plot runs/dqn_cartpole/replay.zarr --out store.png

The functions behind them are in :mod:`streamrl.replay.store_tools`.
"""

import sys

from streamrl.cli import main

if __name__ == "__main__":
    main(["store", *sys.argv[1:]])
