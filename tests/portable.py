"""Beam's portability services on loopback, as a test (or a user) runs them beside a pipeline.

    python -m tests.portable job PORT     # Beam's job service (apache_beam...local_job_service_main)
    python -m tests.portable pool PORT    # a Beam worker pool (apache_beam...worker_pool_main): SDK harnesses

This is the layout of a Flink or Spark cluster running Python (docs/runners.md): a job service receives the
pipeline, and the workers that run our DoFns are separate processes started by a worker pool. Each command
runs Beam's own entry point, with one change: every gRPC server of the process listens on 127.0.0.1 instead
of all interfaces (Beam binds ``[::]``), so that tests never open a port to other machines.
"""

from __future__ import annotations

import sys


def bind_loopback_only() -> None:
    """Make every gRPC server of this process bind 127.0.0.1 (Beam's services bind ``[::]:PORT``)."""
    import grpc._server

    original = grpc._server._Server.add_insecure_port

    def add_insecure_port(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return original(self, address)

    if getattr(grpc._server._Server.add_insecure_port, "__name__", "") != "add_insecure_port_loopback":
        add_insecure_port.__name__ = "add_insecure_port_loopback"
        grpc._server._Server.add_insecure_port = add_insecure_port


def main(argv: list[str]) -> None:
    service, port = argv[0], argv[1]
    bind_loopback_only()
    if service == "job":
        from apache_beam.runners.portability import local_job_service_main

        local_job_service_main.run(["--port", port, *argv[2:]])
    elif service == "pool":
        from apache_beam.runners.worker import worker_pool_main

        worker_pool_main.main(["--service_port", port, *argv[2:]])
    else:
        raise SystemExit(f"unknown service {service!r}: job or pool")


if __name__ == "__main__":
    main(sys.argv[1:])
