"""Imported by the fork server that starts process actors' workers (a preload, see
``process_actor._context``), and by nothing else.

A SIGTERM sent to the whole process group (GNU ``timeout``, a service manager) must not end the
fork server: the trainer learns each worker's exit code from it, and joins its workers through
it while the run stops. It ignores SIGINT already, and exits when the trainer's process does.
The processes it forks get the default handling back (a worker then sets its own)."""

import os
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
