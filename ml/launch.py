"""torchrun, tied to the task that starts it: ``python -m ml.launch [torchrun arguments]``.

The same as ``python -m torch.distributed.run``, except that the agent receives SIGTERM when
its parent (the Airflow task) dies, even by SIGKILL; torchrun then ends its ranks, which are
themselves tied to the agent (:func:`ml.runtime.setup_runtime`). See :mod:`ml.supervise`.
"""

from __future__ import annotations

import os
import sys

from ml.supervise import PARENT_VARIABLE, die_with_parent


def main() -> None:
    die_with_parent()
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if parent and os.getppid() != int(parent):  # it died before we could tie ourselves to it
        sys.exit("error: the task that started training has ended")
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()
