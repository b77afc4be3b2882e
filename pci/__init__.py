"""Generic PCI function model, pure: config space, capabilities, BAR sizing."""
