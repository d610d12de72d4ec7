"""``python -m bench``: run a benchmark suite, print its tables, write its results as JSON."""

from bench.cli import main

if __name__ == "__main__":
    main()
