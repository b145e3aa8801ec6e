"""Serve a policy while it trains: a JSON-lines TCP server in the trainer's own event loop.

Each request is one line of JSON with an observation; the reply is one line with the greedy
action of the newest published weights::

    python examples/policy_server.py --port 8765 --set train.total_env_steps=200000
    echo '{"obs": [0.0, 0.1, 0.0, -0.1]}' | nc 127.0.0.1 8765
    {"action": 1, "weight_version": 5120}

When training ends the server goes on answering with the final policy until Ctrl-C / SIGTERM
(or exits at once with --exit-when-done). Standard library and asyncrl only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from asyncrl import ConfigError, RunError, Trainer


async def serve(args: argparse.Namespace) -> None:
    trainer = Trainer.from_algo(args.algo, env=args.env, overrides=args.set, run_dir=args.run_dir)
    policy = trainer.policy()  # its own network, refreshed from the weight store by version

    clients: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.add(writer)
        try:
            while line := await reader.readline():
                try:
                    # A small network answers in well under a millisecond, so inline in the loop;
                    # for a large one use `await asyncio.to_thread(policy, obs)` (it is thread-safe).
                    action = policy(json.loads(line)["obs"])
                    reply = {"action": action.tolist(), "weight_version": policy.version}
                except Exception as exc:  # a bad request, or training not started yet
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            clients.discard(writer)
            writer.close()

    async def report() -> None:
        async for row in trainer.metrics():
            if "eval/return_mean" in row:
                print(f"eval at {row['env_steps']} env steps: {row['eval/return_mean']:.1f}",
                      file=sys.stderr, flush=True)

    done = asyncio.Event()

    def on_signal() -> None:
        trainer.stop()
        done.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the host program's choice, not the trainer's
        loop.add_signal_handler(sig, on_signal)
    server = await asyncio.start_server(handle, args.host, args.port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(report())
            result = await trainer.run()
            print(json.dumps({"run_dir": result["run_dir"], "env_steps": result["env_steps"]}), flush=True)
            if not args.exit_when_done:
                await done.wait()
    finally:
        # Close the clients still connected as well as the listening socket: from Python 3.12
        # on, wait_closed() waits for every connection, so one idle client would keep the
        # server (and the process) from ever exiting.
        server.close()
        for writer in list(clients):
            writer.close()
        await server.wait_closed()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="dqn", help="registered algorithm (default dqn)")
    p.add_argument("--env", help="env id (default: the algorithm's preset, CartPole-v1 for dqn)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--run-dir", help="where the run writes (default runs/<algo>-<env>-<time>)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    p.add_argument("--exit-when-done", action="store_true", help="stop serving when training ends")
    args = p.parse_args()
    code = 0
    try:
        asyncio.run(serve(args))
    except* ConfigError as group:  # a bad config or env: one line, as the CLI does
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* RunError as group:  # training could not go on
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":  # actors may run in spawned worker processes: guard the entry point
    sys.exit(main())
