"""Fitting: the LightningModule, optimizers and schedules, metrics, checkpoint writing, pictures, loggers."""
