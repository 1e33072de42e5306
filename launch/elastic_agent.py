"""torchrun as ``shardface train`` starts it: one line instead of a traceback when it is signalled.

``python -m launch.elastic_agent <torchrun options> -m train.main ...`` runs
``torch.distributed.run`` unchanged except for two things:

* torchrun turns a handled signal into an exception that leaves its wait for the workers;
  a second signal during that wait (the launcher, srun and the scheduler may each deliver
  one) would cut the ranks' grace period short and send them another signal.  Repeats of
  the first signal are ignored here, so the ranks get exactly one.
* after that signal torchrun's own warnings are silenced and the exception that ends
  torchrun after it stopped its workers becomes one line and the exit code 128 + signal,
  as a shell reports a process killed by that signal.
"""
from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Optional


def _install_single_signal_handler() -> None:
    from torch.distributed.elastic.multiprocessing import api
    original = getattr(api, "_terminate_process_handler", None)
    if original is None:  # another torch: keep its behaviour
        return
    seen: list[int] = []

    def once(signum: int, frame: Optional[FrameType]) -> None:
        if seen:
            return
        seen.append(signum)
        # Its "sending closing signal" warnings would repeat what the ranks and the launcher say.
        logging.disable(logging.WARNING)
        original(signum, frame)

    # torchrun registers the handler by this module-level name each time it starts workers.
    api._terminate_process_handler = once


def main() -> int:
    """Run torchrun with the arguments after the program name."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.run import main as torchrun_main
    _install_single_signal_handler()
    try:
        torchrun_main(sys.argv[1:])
    except SignalException as err:
        print(f"torchrun: stopped the workers after {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 128 + int(signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
