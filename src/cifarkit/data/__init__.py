"""Images from disk to batches: sources, the DataModule, the device loader, augmentation."""
