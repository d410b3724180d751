"""Command line: ``python -m fastbn {bench,info,demo}``."""

import sys

USAGE = """usage: python -m fastbn COMMAND [options]

commands:
  bench   compare fastbn with PyTorch and NumPy on the public shape suite (--help for options)
  info    Numba version, threading layer, thread count, cache directory, CPU
  demo    train a small MLP on handwritten digits with and without batch norm (--help)
"""


def _info(argv):
    if argv:
        print(f"python -m fastbn info: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return 2
    import fastbn

    for key, value in fastbn.info().items():
        print(f"{key:16s} {value}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return _info(rest)
    if cmd == "bench":
        from fastbn.bench.runner import main as bench_main

        return bench_main(rest)
    if cmd == "demo":
        from fastbn.demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
