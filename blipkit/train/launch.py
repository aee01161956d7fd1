"""``blipkit train --processes N``: run the same command again on N processes under ``accelerate launch``.

On GPUs each process takes one device; on CPU the processes share the cores and talk over gloo. The
launcher (torch's elastic agent, which accelerate drives) stops every process as soon as one fails, so a
run never hangs on a lost process; the failing process has printed its own one-line error, and a process
killed by a signal is reported here in one line.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence

import torch

from blipkit.errors import BlipkitError, ConfigError

__all__ = ["LaunchFailedError", "launch_args", "launch_training"]


class LaunchFailedError(BlipkitError):
    """A process of a launched run ended without reporting why (killed by a signal, or crashed)."""


def launch_args(processes: int, train_argv: Sequence[str], launcher_args: str = "") -> list[str]:
    """``accelerate launch`` arguments that run ``blipkit train TRAIN_ARGV`` on ``processes`` processes.

    ``launcher_args`` (accelerate's own options, as one shell-quoted string) come after blipkit's and so
    win; with ``--config_file`` the file decides the strategy (DeepSpeed, FSDP, several machines).
    """
    extra = shlex.split(launcher_args)
    gpus = torch.cuda.device_count()
    if gpus and processes > gpus and "--num_machines" not in extra and "--config_file" not in extra:
        raise ConfigError(f"--processes {processes}: this machine has {gpus} GPUs; start at most {gpus} processes")
    args = ["--num_processes", str(processes)]
    if not {"--config_file", "--num_machines", "--main_process_port"} & set(extra):
        args += ["--main_process_port", "0"]  # one machine: any free port
    if "--config_file" not in extra:
        threads = max(1, (os.cpu_count() or 1) // processes) if not gpus else 1
        args += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--num_cpu_threads_per_process", str(threads)]
    return [*args, *extra, "--module", "blipkit", *train_argv]


def launch_training(processes: int, train_argv: Sequence[str], launcher_args: str = "", resume_hint: str = "") -> None:
    """Run ``blipkit train TRAIN_ARGV`` on ``processes`` processes and wait for them.

    Returns when every process succeeded. Raises SystemExit with the failing process's own exit code
    when it reported its error itself, and LaunchFailedError (one line, naming the process and the
    signal or code) when it could not.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_args(processes, ["train", *train_argv], launcher_args))
    if not os.environ.get("BLIPKIT_DEBUG"):
        # The agent logs every stop it makes; the failing process already said what went wrong.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (1, 2):
            sys.stderr.flush()
            raise SystemExit(failure.exitcode) from None
        how = f"was stopped by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        raise LaunchFailedError(
            f"process {rank} (pid {failure.pid}) {how}; the other processes were stopped too. {resume_hint}".strip()
        ) from None
