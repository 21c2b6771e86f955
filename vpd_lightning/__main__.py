"""`python -m vpd_lightning fit --config configs/X.yaml`."""

from vpd_lightning.cli import main

if __name__ == "__main__":
    main()
