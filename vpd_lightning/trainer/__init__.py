"""Lightning glue: the LightningModule, its data, stepping, evaluation, checkpoints, strategies."""
