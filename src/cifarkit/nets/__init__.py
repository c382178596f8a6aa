"""The nets, where their first weights come from, and a saved net read back and rebuilt."""
