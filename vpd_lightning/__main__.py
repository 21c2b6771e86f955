"""`python -m vpd_lightning fit --config configs/X.yaml`."""

import sys


def main() -> None:
    sys.exit(
        "vpd_lightning: the training CLI is not built yet (see the trainer issue). "
        "`make test` runs the test suite."
    )


if __name__ == "__main__":
    main()
